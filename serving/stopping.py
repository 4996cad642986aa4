"""Acting the moment a server worker is told to stop, before the server's own handling of the signal.

gunicorn installs a worker's signal handlers before it builds the app, so an app factory can chain its
own: the action runs first (it must be quick and must not block: set a flag, start a thread), then
gunicorn's handler (SIGTERM: stop accepting, drain the requests in flight within the graceful timeout).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def on_stop_signals(action: Callable[[], None], signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
    """Run `action()` when one of `signals` arrives, then whatever handled it before (main thread only)."""
    for sig in signals:
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            action()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)

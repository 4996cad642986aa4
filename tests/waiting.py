"""Wait on the thing, not on the clock: poll a condition until it holds, with a deadline that fails the test.

Why: a fixed nap before an assertion passes on a quiet machine and fails (or, worse, passes
without testing anything) on a loaded one. A poll ends as soon as the condition holds and says what
it was waiting for when it does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float = 5.0, message: str = "the condition", interval: float = 0.01
) -> T:
    """Poll `condition` until it returns something truthy (returned); AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)  # the poll interval: the one sleep the tests need


def answers_200(url: str, *, verify: Any = True, timeout: float = 2.0) -> bool:
    """True when a GET of `url` answers 200; False while the server is not listening yet."""
    import httpx

    try:
        return httpx.get(url, verify=verify, timeout=timeout).status_code == 200
    except httpx.TransportError:
        return False

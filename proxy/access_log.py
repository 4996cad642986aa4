"""One access-log line per request: method, path, model, status, duration, and why a refusal was a refusal.

The line is written when the response is finished (a stream: when its last byte went out or the client
left), so the duration is the client's wait. The handler puts the model and the refusal's reason in the
WSGI environ (`ibc.model`, `ibc.reason`); everything else comes from the request and the status line.
Fields are passed as `extra`, so `--log-format json` prints them as keys; the text line reads:

    POST /v1/chat/completions model=model-b status=429 duration_ms=2.1 reason=insufficient_memory
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("ibc.access")

MODEL_KEY = "ibc.model"
REASON_KEY = "ibc.reason"

WSGIApp = Callable[[dict[str, Any], Any], Iterable[bytes]]


class _Finished:
    """The response body, passed through as it is; `close()` (which every WSGI server calls) logs the line."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]) -> None:
        self._body = body
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done()


def access_logged(app: WSGIApp) -> WSGIApp:
    """Wrap a WSGI app so each request leaves one line on the `ibc.access` logger (INFO)."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if not log.isEnabledFor(logging.INFO):
            return app(environ, start_response)
        started = time.perf_counter()
        status: list[str] = []

        def record_status(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status[:] = [line]
            return start_response(line, headers, exc_info) if exc_info else start_response(line, headers)

        def done() -> None:
            code = int(status[0].split(" ", 1)[0]) if status else 0
            fields: dict[str, Any] = {
                "method": environ.get("REQUEST_METHOD", ""),
                "path": environ.get("PATH_INFO", ""),
                "model": environ.get(MODEL_KEY) or "-",
                "status": code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            reason = environ.get(REASON_KEY)
            if reason:
                fields["reason"] = reason
            text = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("method", "path"))
            log.info("%s %s %s", fields["method"], fields["path"], text, extra=fields)

        try:
            body = app(environ, record_status)
        except BaseException:
            status[:] = ["500 Internal Server Error"]
            done()
            raise
        return _Finished(body, done)

    return wrapped

"""WSGI wrappers the gunicorn workers of `serving.runner` put around every app.

Why a module of its own: both worker classes (gthread in `serving.runner`, gevent in
`serving.head_deadline`) use it, and it imports nothing but the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

WSGIApp = Callable[..., Any]


def honour_connection_close(app: WSGIApp) -> WSGIApp:
    """`app` whose `Connection: close` response header reaches the client and closes the connection.

    gunicorn drops hop-by-hop headers an app sets and answers `Connection: keep-alive`, so a 408 for a
    stalled upload said keep-alive and then closed. Its `start_response` is a method of its response
    object; `force_close()` there makes gunicorn say close and end the connection after the answer.
    """

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            for name, value in headers:
                if len(name) == 10 and name.lower() == "connection" and value.strip().lower() == "close":
                    force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                    if force_close is not None:
                        force_close()
                    break
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped

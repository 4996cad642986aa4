"""Bind addresses: the one rule every `ibc` server (and the mock backend) reads `--bind` with.

`HOST:PORT`, `:PORT` (all interfaces) or `[IPv6]:PORT`. An IPv6 address must be in brackets, so
`::1:8080` is refused rather than guessed at. Stdlib only: the mock backend imports this too.
"""

from __future__ import annotations


class ServeError(ValueError):
    """The server cannot start as configured (bad bind address, TLS files, worker counts)."""


class BindError(ServeError):
    """A bind address is not of the form HOST:PORT."""


def parse_bind(bind: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:PORT`; empty host = all interfaces, 0.0.0.0) into host and port.

    Port 0 asks the OS for a free port. Raises BindError (a ValueError) with a one-line message.
    """
    text = bind.strip() if isinstance(bind, str) else ""
    if text.startswith("unix:"):
        raise BindError(f"bind {bind!r}: unix sockets are not supported, use HOST:PORT")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":") or not host:
            raise BindError(f"bind {bind!r}: expected [IPv6]:PORT, e.g. [::1]:8443")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            hint = f" ({text} alone is not HOST:PORT: write :{text} for all interfaces)" if text.isdigit() else ""
            raise BindError(f"bind {bind!r}: expected HOST:PORT, e.g. 0.0.0.0:8443 or 127.0.0.1:0{hint}")
        if ":" in host:
            raise BindError(f"bind {bind!r}: put an IPv6 address in brackets, e.g. [::]:8443")
        host = host or "0.0.0.0"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise BindError(f"bind {bind!r}: port must be a number from 0 to 65535 (HOST:PORT)")
    return host, int(port_text)


def format_bind(host: str, port: int) -> str:
    """The inverse of parse_bind, with brackets around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url_host(host: str) -> str:
    """The host to call a server on that is bound to `host` (a wildcard address means this machine)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

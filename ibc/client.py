"""Talking to a running `ibc proxy` or `ibc local` from the command line (`ibc status`, `ibc start|stop`).

One small HTTP client: the URL (default: where `ibc local` listens by default), the API key (from
`--api-key-file` or `IBC_API_KEY`, sent as `Authorization: Bearer`), and errors turned into one line.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
KEY_ENV = "IBC_API_KEY"
TIMEOUT_SECONDS = 10.0
# httpx logs every request at INFO: the command's own output says what happened.
logging.getLogger("httpx").setLevel(logging.WARNING)


class ClientError(Exception):
    """The proxy could not be reached, or answered something else than expected (message is one line)."""


class InputError(ClientError):
    """A flag's value cannot be used (a missing key file, a malformed URL): the command exits 2."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any  # parsed JSON, or the text when the body is not JSON


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        metavar="URL",
        help=f"a running `ibc proxy` or `ibc local` (default {DEFAULT_URL}, where `ibc local` listens)",
    )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help=f"send the first key in this file as `Authorization: Bearer` (or set {KEY_ENV})",
    )


def api_key(path: str | None) -> str | None:
    """The key to send: the first non-comment line of the file, else $IBC_API_KEY, else None."""
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InputError(f"--api-key-file {path}: {exc.strerror or exc}") from exc
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise InputError(f"--api-key-file {path}: no key in the file")
        return keys[0]
    return os.environ.get(KEY_ENV) or None


def call(
    method: str,
    url: str,
    path: str,
    *,
    key: str | None = None,
    params: dict[str, str] | None = None,
    timeout_seconds: float = TIMEOUT_SECONDS,
) -> Answer:
    """One request; the answer whatever its status (callers decide), ClientError when there is none."""
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    target = url.rstrip("/") + path
    try:
        response = httpx.request(method, target, headers=headers, params=params, timeout=timeout_seconds)
    except httpx.InvalidURL as exc:
        raise InputError(f"--url {url}: {exc}") from exc
    except httpx.UnsupportedProtocol as exc:
        raise InputError(f"--url {url}: give http:// or https:// ({exc})") from exc
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach {url}: {exc} (is `ibc local` or `ibc proxy` running there?)") from exc
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return Answer(response.status_code, body)


def error_message(answer: Answer) -> str:
    """The message of an error answer (OpenAI's shape, the 429's shape, or plain text)."""
    body = answer.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return f"HTTP {answer.status}: {str(body)[:300]}"

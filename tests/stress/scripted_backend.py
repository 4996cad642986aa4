"""A model backend that misbehaves on purpose, run by `ibc local` as a model command in the stress tier.

    python scripted_backend.py PORT MODE RECORD

`GET /health` answers 200. Every POST is read whole and recorded as one line in RECORD, then, by MODE:

- `reset`: the first POST is answered (keep-alive, so the proxy pools the connection); every later one
  is read and then the connection is reset (SO_LINGER 0), as a crashing server after it took the work;
- `slow`: a non-streaming POST is answered at once; a streaming one gets a stream whose first event
  comes at once and the next after 60 s; when the proxy closes the connection, `closed` is recorded
  (the moment the backend could stop generating).
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time


def record(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def read_request(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head, body, rest) of the next request on `conn`, or None when the peer closed."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, buf = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    return head, buf[:length], buf[length:]


def serve_one(conn: socket.socket, mode: str, path: str, posts: list[int]) -> None:
    buf = b""
    with conn:
        while True:
            got = read_request(conn, buf)
            if got is None:
                return
            head, body, buf = got
            if head.startswith(b"GET"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            posts.append(1)
            record(path, f"request {len(posts)} {body[:60].decode(errors='replace')}")
            answer = b'{"id":"x","object":"chat.completion","choices":[]}'
            plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                len(answer),
                answer,
            )
            if mode == "reset":
                if len(posts) == 1:
                    conn.sendall(plain)
                    continue
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if b'"stream":true' not in body.replace(b" ", b""):
                conn.sendall(plain)  # not a stream: answered at once (how a test warms the model)
                continue
            event = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (len(event), event)
            )
            conn.settimeout(60)
            try:
                closed = conn.recv(1) == b""
            except OSError:
                closed = True
            if closed:
                record(path, f"closed {time.time():.3f}")
            return


def main() -> None:
    port, mode, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = socket.create_server(("127.0.0.1", port))
    posts: list[int] = []
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve_one, args=(conn, mode, path, posts), daemon=True).start()


if __name__ == "__main__":
    main()

"""Fault injection between a client and a real server: an HTTP proxy that passes requests through,
answers 500, stalls, or refuses, switched while traffic flows (S3 for deltalake, QuestDB's REST).

It runs in a process of its own (deltalake's Rust client can hold the GIL while it waits on a
socket, which would starve a proxy thread in the test's process) and takes its mode over HTTP
on `/__fault__/MODE`; `GET /__fault__` answers how many requests it faulted.
"""

from __future__ import annotations

import contextlib
import http.client
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlparse

Mode = Literal["pass", "error", "stall", "refuse"]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # every client reconnects at once when a fault ends


class ProxyServer:
    """The proxy itself: `python tests/faults.py UPSTREAM STALL_SECONDS` prints its URL and serves.

    pass: forwarded unchanged; error: 500 with an S3-style XML body; stall: held for `stall_seconds`
    then 503; refuse: the connection is closed without an answer. `failed` counts faulted requests.
    """

    def __init__(self, upstream: str, stall_seconds: float = 30.0) -> None:
        target = urlparse(upstream)
        self.host, self.port = target.hostname or "127.0.0.1", target.port or 80
        self.mode: Mode = "pass"
        self.stall_seconds = stall_seconds
        self.failed = 0
        self.requests = 0  # every request it was sent, passed or faulted
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            # One request a connection ("Connection: close"): a client's pooled keep-alive connection
            # to this proxy was seen to hang for the client's whole timeout after faults.
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                # A client that gave up (its own timeout, during a stall) is not an error of the proxy's.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    super().handle()

            def _any(self) -> None:
                if self.path.startswith("/__fault__"):
                    wanted = self.path.removeprefix("/__fault__").strip("/")
                    if wanted == "requests":
                        self._reply(200, str(proxy.requests).encode())
                        return
                    if wanted:
                        proxy.mode = wanted  # type: ignore[assignment]
                    self._reply(200, str(proxy.failed).encode())
                    return
                proxy.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                mode = proxy.mode
                if mode != "pass":
                    proxy.failed += 1
                if mode == "refuse":
                    self.close_connection = True
                    return
                if mode == "stall":
                    time.sleep(proxy.stall_seconds)
                    self._reply(503, b"<Error><Code>SlowDown</Code></Error>")
                    return
                if mode == "error":
                    self._reply(500, b"<Error><Code>InternalError</Code><Message>injected</Message></Error>")
                    return
                began = time.monotonic()
                upstream = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                if time.monotonic() - began > 5:
                    print(
                        f"SLOW UPSTREAM {self.command} {self.path} {time.monotonic() - began:.1f}s "
                        f"{dict(self.headers)}",
                        file=sys.stderr,
                        flush=True,
                    )
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            def _reply(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Connection", "close")
                self.close_connection = True
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

            def log_message(self, *_: Any) -> None:
                return None

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


class FaultyProxy:
    """`with FaultyProxy(upstream) as proxy:` a ProxyServer process on `proxy.url`; `proxy.set(mode)`
    at any time, `proxy.failed()` counts the requests it faulted."""

    def __init__(self, upstream: str, stall_seconds: float = 30.0) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, upstream, str(stall_seconds)],
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()

    def _control(self, path: str) -> int:
        with urllib.request.urlopen(f"{self.url}/__fault__{path}", timeout=5) as answer:
            return int(answer.read())

    def set(self, mode: Mode) -> None:
        self._control(f"/{mode}")

    def failed(self) -> int:
        return self._control("")

    def requests(self) -> int:
        return self._control("/requests")

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *_: Any) -> None:
        self.process.terminate()
        self.process.wait(10)


if __name__ == "__main__":
    server = ProxyServer(sys.argv[1], float(sys.argv[2]))
    print(server.url, flush=True)
    server.server.serve_forever()

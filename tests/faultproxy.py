"""A fault-injecting HTTP proxy for tests: forwards to a real server, except where a scripted
fault says to answer 429 / 500 / 503 itself, or to drop the connection before or after
forwarding (the last is the nasty one: the server acted, the client never hears of it), or to
hang: take the request and answer nothing until the client's timeout has passed, before
forwarding ("hang") or after it ("hang_after": the server acted, the client timed out)."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    def __init__(self, upstream_port: int, faults: list[tuple[str, str, str]], hang_s: float = 30.0):
        """faults: (METHOD, path substring, fault) consumed in order, each once. A hang lasts hang_s
        (longer than the client's timeout) or until close()."""
        self.upstream_port = upstream_port
        self.hang_s = hang_s
        self.released = threading.Event()
        self.faults = list(faults)
        self.injected: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                fault = proxy._take(self.command, self.path)
                if fault in ("429", "500", "503"):
                    payload = json.dumps({"error": {"message": f"injected {fault}", "type": "server_error", "param": None, "code": None}}).encode()
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("retry-after", "0")
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault in ("drop_before", "hang"):
                    if fault == "hang":
                        proxy.released.wait(proxy.hang_s)
                    self.close_connection = True
                    self.connection.close()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "hang_after":
                    proxy.released.wait(proxy.hang_s)
                if fault in ("drop_after", "hang_after"):
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _take(self, method: str, path: str) -> str | None:
        with self.lock:
            for i, (m, sub, fault) in enumerate(self.faults):
                if m == method and sub in path:
                    del self.faults[i]
                    self.injected.append((m, sub, fault))
                    return fault
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.released.set()  # ends any hang still waiting
        self.server.shutdown()

"""Server restart while a file uploads (issue 10, part 5): SIGKILL `tunejob serve` twice during a
20 MB multipart upload, once while the body is still arriving and once as soon as the server starts
writing the file under DATA_DIR/files/; restart on the same data dir each time.

Held: the upload is either absent or complete (never listed half-written); the file uploaded
before is still listed and downloads byte-identical; nothing is left in files/ that no id names;
a new upload works."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from conftest import write_chat_data
from test_serve import KEY_A, Server, client

BOUNDARY = "tunejob-reliability-boundary"


def multipart(content: bytes, filename: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


def start_upload(server: Server, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {KEY_A}\r\n"
                  f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode())
    return sock


def send_slowly(sock: socket.socket, data: bytes, chunk: int = 256 * 1024, pause: float = 0.02) -> None:
    for i in range(0, len(data), chunk):
        sock.sendall(data[i : i + chunk])
        time.sleep(pause)


def check_nothing_lost(server: Server, before, before_bytes: bytes, big: bytes) -> str:
    """The state a restart must show; returns what became of the interrupted upload."""
    c = client(server)
    listed = {f.id: f for f in c.files.list()}
    assert before.id in listed and c.files.content(before.id).content == before_bytes, "a stored file was lost or changed"
    others = [f for fid, f in listed.items() if fid != before.id]
    for f in others:  # the interrupted upload may only appear complete
        assert f.bytes == len(big) and c.files.content(f.id).content == big, (f.bytes, len(big))
    on_disk = {p.name for p in (Path(server.data_dir) / "files").iterdir()}
    assert on_disk == set(listed), f"files no id names (partial uploads): {on_disk - set(listed)}"
    return "complete" if others else "absent"


@pytest.mark.slow
def test_sigkill_during_uploads_loses_and_corrupts_nothing(tmp_path, tiny_model):
    data_dir = tmp_path / "data"
    small = write_chat_data(tmp_path / "small.jsonl", 30)
    big_path = write_chat_data(tmp_path / "big.jsonl", 110_000, seed=3)  # ~20 MB: the server needs a few seconds to take it in
    big = big_path.read_bytes()
    body = multipart(big, "big.jsonl")
    outcomes: list[str] = []

    s = Server(data_dir, tiny_model).start()
    servers = [s]
    try:
        before = client(s).files.create(file=open(small, "rb"), purpose="fine-tune")
        before_bytes = small.read_bytes()

        # Kill 1: half the body sent, slowly; the server is still reading it.
        sock = start_upload(s, body)
        send_slowly(sock, body[: len(body) // 2])
        s.kill()
        sock.close()
        s = Server(data_dir, tiny_model).start()
        servers.append(s)
        outcomes.append("mid-body: " + check_nothing_lost(s, before, before_bytes, big))

        # Kill 2: the whole body sent; kill as soon as anything new appears in files/ (the .part
        # file being written, or the renamed file being validated before its row exists).
        files_dir = data_dir / "files"
        known = {p.name for p in files_dir.iterdir()}
        sock = start_upload(s, body)
        sock.sendall(body)
        deadline, seen = time.time() + 30, None
        while time.time() < deadline and seen is None:
            seen = next((p.name for p in files_dir.iterdir() if p.name not in known), None)
            time.sleep(0.0005)
        s.kill()
        sock.close()
        s = Server(data_dir, tiny_model).start()
        servers.append(s)
        window = "writing .part" if seen and seen.endswith(".part") else ("validating" if seen else "no file seen")
        outcomes.append(f"{window}: " + check_nothing_lost(s, before, before_bytes, big))

        # A new upload on the restarted server works and round-trips.
        again = client(s).files.create(file=open(big_path, "rb"), purpose="fine-tune")
        assert again.status == "processed" and again.bytes == len(big)
        assert client(s).files.content(again.id).content == big
        assert {before.id, again.id} <= {f.id for f in client(s).files.list()}
        print(f"\n[upload-restart] 2 SIGKILLs during a {len(big):,}-byte upload: {outcomes}; files lost: 0")
    finally:
        for srv in servers:
            srv.stop()

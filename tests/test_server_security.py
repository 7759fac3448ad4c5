"""tunejob serve's security defaults, on the app in-process (no training, no model loads)."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import stat

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from tunejob.server.app import ServerConfig, create_app
from tunejob.server.dashboard.views import local_dashboard

KEY = "sk-security-test-key-1234"
PUBLIC = {("GET", "/health"), ("GET", "/login"), ("POST", "/login")}  # + /static/* (plotly.js, CSS, JS: no data)


@pytest.fixture
def app(tmp_path):
    return create_app(ServerConfig(data_dir=tmp_path / "data", api_keys={KEY}, default_model=str(tmp_path / "no-model"), max_upload_bytes=50_000))


def all_routes(routes):
    """app.routes with included routers opened (FastAPI 0.16x keeps them as _IncludedRouter)."""
    for route in routes:
        if hasattr(route, "original_router"):
            yield from all_routes(route.original_router.routes)
        else:
            yield route


def test_every_route_needs_a_key_or_a_session(app):
    anonymous = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    checked = 0
    for route in all_routes(app.routes):
        if not isinstance(route, (APIRoute, Route)) or route.path.startswith("/static/"):
            continue
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in sorted(route.methods - {"HEAD"}):
            res = anonymous.request(method, path)
            if (method, route.path) in PUBLIC:
                assert res.status_code < 400, (method, route.path, res.status_code)
                continue
            refused = res.status_code == 401 or (res.status_code == 303 and res.headers["location"] == "/login")
            assert refused, f"{method} {route.path} answered {res.status_code} without a key: {res.text[:200]}"
            checked += 1
    assert checked >= 25  # the API's 18 routes and the dashboard's pages
    assert anonymous.get("/openapi.json").status_code == 404 and anonymous.get("/docs").status_code == 404


def test_owner_ids_are_hmacs_under_a_private_secret(app, tmp_path):
    c = TestClient(app, headers={"Authorization": f"Bearer {KEY}"})
    assert c.post("/v1/files", files={"file": ("a.txt", b"x")}, data={"purpose": "user_data"}).status_code == 200
    secret = tmp_path / "data" / "server.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    (owner,), = sqlite3.connect(tmp_path / "data" / "tunejob.sqlite3").execute("SELECT owner FROM files").fetchall()
    assert len(owner) == 64 and owner not in (hashlib.sha256(KEY.encode()).hexdigest(), hashlib.sha256(KEY.encode()).hexdigest()[:32])
    # the same secret is used after a restart: the key still sees its file
    again = create_app(ServerConfig(data_dir=tmp_path / "data", api_keys={KEY}))
    assert len(TestClient(again, headers={"Authorization": f"Bearer {KEY}"}).get("/v1/files").json()["data"]) == 1


def send_chunked(app, path: str, content_type: bytes, pieces: list[bytes]) -> tuple[int, list[dict]]:
    """POST `pieces` as ASGI messages without a Content-Length (a chunked body), with KEY; returns
    how many messages the app read and what it sent."""
    import asyncio

    read, sent = [], []

    async def receive():
        read.append(1)
        return {"type": "http.request", "body": pieces[len(read) - 1], "more_body": len(read) < len(pieces)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5),
             "headers": [(b"host", b"x"), (b"authorization", f"Bearer {KEY}".encode()), (b"content-type", content_type),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(app(scope, receive, send))
    return len(read), sent


def test_a_chunked_upload_over_the_limit_is_413_and_leaves_nothing(app, tmp_path):
    """A 10 MB multipart body in 10 kB ASGI messages, no Content-Length: the app must stop reading
    at the limit (50 kB + 64 kB of form overhead), answer 413, and leave no file behind."""
    pieces = [b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n',
              b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n', *[b"x" * 10_000] * 1000, b"\r\n--B--\r\n"]
    read, sent = send_chunked(app, "/v1/files", b"multipart/form-data; boundary=B", pieces)
    assert sent[0]["status"] == 413 and b"file_too_large" in sent[1]["body"]
    assert read < 15  # ~115 kB read of 10 MB
    assert list((tmp_path / "data" / "files").iterdir()) == []


def test_a_chunked_json_body_over_the_cap_is_413_once_the_cap_is_read(app):
    """Issue 31, finding 8: a 20 MB job body in 10 kB messages, no Content-Length. The app must
    answer 413 once it has read the 16 MB cap (--max-body-mb's default), not read and parse it all."""
    pieces = [b'{"model": "default", "training_file": "', *[b"x" * 10_000] * 2000, b'"}']
    read, sent = send_chunked(app, "/v1/fine_tuning/jobs", b"application/json", pieces)
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"
    assert read <= (16 << 20) // 10_000 + 2  # stopped at the cap: 16 MB of 20


def _logged_in(app) -> TestClient:
    c = TestClient(app, follow_redirects=False)
    assert c.post("/login", data={"key": KEY}).status_code == 303
    return c


def test_dashboard_forms_need_the_sessions_csrf_token(app):
    c = _logged_in(app)
    page = c.get("/upload").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert page.count('name="csrf"') == 2  # the upload form and the logout button
    files = {"file": ("d.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')}
    assert c.post("/upload", files=files).status_code == 403
    assert c.post("/upload", files=files, data={"csrf": "forged"}).status_code == 403
    assert c.post("/upload", files=files, data={"csrf": token}).status_code == 200
    assert c.post("/logout").status_code == 403  # a cross-site logout is refused too
    assert _logged_in(app).post("/upload", files=files, data={"csrf": token}).status_code == 403  # tied to its session


def test_dashboard_login_is_rate_limited(app):
    c = TestClient(app, follow_redirects=False)
    for _ in range(5):
        assert c.post("/login", data={"key": "sk-guess-000000"}).headers["location"] == "/login?error=1"
    blocked = c.post("/login", data={"key": KEY})  # even the right key waits out the minute
    assert blocked.status_code == 429 and "Too many failed logins" in blocked.text


def test_local_dashboard_answers_only_its_own_host(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    app = local_dashboard([run], port=8123)
    assert TestClient(app, base_url="http://127.0.0.1:8123").get("/").status_code == 200
    assert TestClient(app, base_url="http://localhost:8123").get("/").status_code == 200
    for host in ("http://attacker.example:8123", "http://127.0.0.1:9999", "http://0.0.0.0:8123"):
        assert TestClient(app, base_url=host).get("/").status_code == 421, host


def test_keys_come_from_the_environment_or_a_file_and_api_key_warns(tmp_path, capsys):
    from tunejob.server.run import load_keys

    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nsk-file-1-0123456789 alice\n\n")
    assert load_keys([], keys_file, {"TUNEJOB_API_KEYS": "sk-env-1-0123456789, sk-env-2-0123456789"}) == {
        "sk-env-1-0123456789", "sk-env-2-0123456789", "sk-file-1-0123456789"}
    assert "warning" not in capsys.readouterr().err
    assert load_keys(["sk-flag-0123456789"], None, {}) == {"sk-flag-0123456789"}
    assert "shows the key to anyone who can run `ps`" in capsys.readouterr().err


def test_rows_of_the_old_sha256_owner_ids_move_to_the_hmac_ids(tmp_path):
    """A data dir written before HMAC owner ids: the key's files are still its own after the upgrade."""
    from tunejob.server.jobs.store import Store

    old_owner = hashlib.sha256(KEY.encode()).hexdigest()[:32]
    store = Store(tmp_path / "data")
    store.file_path("file-old").write_bytes(b"x")
    store.add_file(old_owner, "old.jsonl", "user_data", 1, "processed", None, "file-old")
    store.close()
    app = create_app(ServerConfig(data_dir=tmp_path / "data", api_keys={KEY}))
    assert [f["id"] for f in TestClient(app, headers={"Authorization": f"Bearer {KEY}"}).get("/v1/files").json()["data"]] == ["file-old"]

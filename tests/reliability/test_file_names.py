"""Upload file names cannot escape the data directory (issue 10, server part): files are stored
under their generated id; the client's name is only a label, returned as given."""

from __future__ import annotations

from pathlib import Path

import pytest

KEY = "sk-names-test"
NAMES = ["../escape.jsonl", "../../escape2.jsonl", "/tmp/absolute-escape.jsonl", "a/b/c.jsonl", "..\\windows-escape.jsonl",
         "..", ".", "", "con.jsonl", "x" * 300 + ".jsonl", "nul\x00byte.jsonl", "%2e%2e%2fencoded.jsonl"]
LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@pytest.fixture
def api(tmp_path):
    from fastapi.testclient import TestClient

    from tunejob.server.app import ServerConfig, create_app

    data_dir = tmp_path / "deep" / "data"
    app = create_app(ServerConfig(data_dir=data_dir, api_keys={KEY}, default_model=str(tmp_path / "no-such-model")))
    return TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {KEY}"}), data_dir, tmp_path


@pytest.mark.parametrize("name", NAMES)
def test_upload_names_stay_labels(api, name):
    client, data_dir, root = api
    before = {p for p in root.rglob("*") if not p.is_relative_to(data_dir)}
    res = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, LINE * 12, "application/jsonl")})
    assert res.status_code in (200, 400), res.text
    after = {p for p in root.rglob("*") if not p.is_relative_to(data_dir)}
    assert after == before, f"{name!r} wrote outside the data dir: {after - before}"
    escapes = (root / "escape.jsonl", root.parent / "escape2.jsonl", root / "deep" / "escape.jsonl", Path("/tmp/absolute-escape.jsonl"))
    assert not any(p.exists() for p in escapes)
    if res.status_code == 200:
        f = res.json()
        stored = [p.name for p in (data_dir / "files").iterdir()]
        assert stored and all(p.startswith("file-") for p in stored), stored
        assert client.get(f"/v1/files/{f['id']}/content").content == LINE * 12

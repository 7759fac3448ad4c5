"""backend: openai, end to end against tunejob serve on loopback through a fault-injecting proxy
(real server, real SDK; the proxy answers 429/500/503 and drops connections by script)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

from conftest import run_cli, write_chat_data
from faultproxy import FaultProxy
from test_serve import KEY_A, Server
from tunejob.backends.jobstore import JobStore
from tunejob.monitor.metrics import read_metrics


def spec_for(tmp_path: Path, base_url: str, data: Path, epochs: int = 2, timeout: float = 60) -> Path:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: api-job\nbackend: openai\nmodel: gpt-4o-mini-2024-07-18\ndata: {{train: {data}, val_fraction: 0.2}}\n"
        f"hyperparameters: {{epochs: {epochs}, batch_size: 4}}\noutput_dir: {tmp_path / 'run'}\n"
        f"openai: {{base_url: '{base_url}', api_key_env: TJ_TEST_KEY, poll_interval: 0.3, max_retries: 4, suffix: sales, timeout: {timeout}}}\n"
    )
    return spec


def env(tmp_path: Path) -> dict:
    return {"TUNEJOB_HOME": str(tmp_path / "home"), "TJ_TEST_KEY": KEY_A}


def test_faults_at_every_call_create_exactly_one_job(tmp_path, tiny_model):
    server = Server(tmp_path / "data", tiny_model).start()
    faults = [
        ("POST", "/files", "429"), ("POST", "/files", "500"), ("POST", "/files", "drop_before"),
        ("GET", "/fine_tuning/jobs?", "503"),             # the tag lookup before create
        ("POST", "/fine_tuning/jobs", "500"),             # answered by the proxy: nothing created
        ("POST", "/fine_tuning/jobs", "drop_after"),      # created on the server, response lost
        ("GET", "/fine_tuning/jobs/ftjob", "500"), ("GET", "/events", "429"), ("GET", "/events", "drop_before"),
        ("GET", "/checkpoints", "503"),
    ]
    proxy = FaultProxy(server.port, faults)
    try:
        data = write_chat_data(tmp_path / "d.jsonl", 30)
        res = run_cli("run", str(spec_for(tmp_path, proxy.url, data)), env=env(tmp_path))
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["status"] == "succeeded" and summary["fine_tuned_model"].startswith("ft:gpt-4o-mini-2024-07-18:tunejob:sales:")
        assert not proxy.faults, f"faults not reached: {proxy.faults}"
        direct = OpenAI(base_url=server.url, api_key=KEY_A, max_retries=0)
        jobs = list(direct.fine_tuning.jobs.list())
        assert len(jobs) == 1, "a retried create made a second job"
        record = JobStore(tmp_path / "home" / "jobs.sqlite3").list()[0]
        assert record.remote_id == jobs[0].id and record.status == "succeeded"
        trains = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
        assert trains == list(range(1, 13))  # 24 train examples / 4 x 2 epochs, each once
        assert (tmp_path / "run" / "summary.json").is_file()
        assert run_cli("report", str(tmp_path / "run")).returncode == 0  # the report works for API jobs
        assert run_cli("diagnose", str(tmp_path / "run"), "--json").returncode == 0
        for target in (record.id, summary["fine_tuned_model"]):  # chat through the provider
            reply = run_cli("chat", target, "alpha beta", "--max-new-tokens", "4", env=env(tmp_path))
            assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr
    finally:
        proxy.close()
        server.stop()


def test_timeouts_at_every_call_create_exactly_one_job(tmp_path, tiny_model):
    """The proxy takes a request and answers nothing for longer than openai.timeout (2 s): before
    forwarding, and once after the server created the job (the client must find it by its tag)."""
    server = Server(tmp_path / "data", tiny_model).start()
    faults = [
        ("POST", "/files", "hang"), ("GET", "/fine_tuning/jobs?", "hang"),
        ("POST", "/fine_tuning/jobs", "hang_after"),      # created on the server, the client timed out
        ("GET", "/fine_tuning/jobs/ftjob", "hang"), ("GET", "/events", "hang"), ("GET", "/checkpoints", "hang"),
    ]
    proxy = FaultProxy(server.port, faults)
    try:
        data = write_chat_data(tmp_path / "d.jsonl", 30)
        started = time.time()
        res = run_cli("run", str(spec_for(tmp_path, proxy.url, data, timeout=2)), env=env(tmp_path))
        assert res.returncode == 0, res.stderr
        assert "create failed (APITimeoutError)" in res.stderr
        assert json.loads(res.stdout)["status"] == "succeeded"
        assert not proxy.faults and len(proxy.injected) == 6, proxy.faults
        direct = OpenAI(base_url=server.url, api_key=KEY_A, max_retries=0)
        jobs = list(direct.fine_tuning.jobs.list())
        assert len(jobs) == 1, "a timed-out create made a second job"
        assert len([f for f in direct.files.list() if f.purpose == "fine-tune"]) == 2  # train + validation, each once
        record = JobStore(tmp_path / "home" / "jobs.sqlite3").list()[0]
        assert record.remote_id == jobs[0].id and record.status == "succeeded"
        print(f"\n[api-faults] {len(proxy.injected)} timeouts injected; run took {time.time() - started:.1f}s")
    finally:
        proxy.close()
        server.stop()


def test_killed_watch_reattaches_and_loses_nothing(tmp_path, tiny_model):
    server = Server(tmp_path / "data", tiny_model).start()
    try:
        data = write_chat_data(tmp_path / "d.jsonl", 120)
        spec = spec_for(tmp_path, server.url, data, epochs=3)
        e = {**os.environ, **env(tmp_path)}
        proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=e)
        store_path = tmp_path / "home" / "jobs.sqlite3"
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline:
            if metrics.exists() and any(r["kind"] == "train" for r in read_metrics(metrics)):
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        record = JobStore(store_path).list()[0]
        assert record.remote_id, "the job id was stored before polling"
        res = run_cli("watch", record.id, env=env(tmp_path))
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["status"] == "succeeded"
        steps = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"]
        assert steps == list(range(1, 73)), "every step once: none lost, none repeated"  # 96/4 x 3
        listed = run_cli("jobs", "--json", env=env(tmp_path))
        assert json.loads(listed.stdout)[0]["status"] == "succeeded"
    finally:
        server.stop()


def test_missing_key_and_training_not_available_are_clear(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    spec = spec_for(tmp_path, "http://127.0.0.1:9/v1", data)
    res = run_cli("run", str(spec), env={"TUNEJOB_HOME": str(tmp_path / "home"), "TJ_TEST_KEY": ""})
    assert res.returncode == 2 and "set TJ_TEST_KEY" in res.stderr
    from tunejob.backends.openai_api import explain
    from tunejob.spec import OpenAISettings
    import httpx2 as httpx  # the SDK's transport: a real response object, no network
    import openai

    # OpenAI's 403 cannot be produced on demand here; the error object is built as the SDK builds it.
    request = httpx.Request("POST", "https://api.openai.com/v1/fine_tuning/jobs")
    response = httpx.Response(403, request=request, json={"error": {"code": "training_not_available"}})
    err = openai.PermissionDeniedError("OpenAI is winding down the fine-tuning platform", response=response,
                                       body={"code": "training_not_available", "message": "winding down"})
    msg = str(explain(err, OpenAISettings()))
    assert "training_not_available" in msg and "tunejob serve" in msg and "backend: local" in msg

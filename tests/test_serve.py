"""tunejob serve, driven by the official openai SDK over real HTTP on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from conftest import write_chat_data
from tunejob.server.run import free_port, wait_until_up

KEY_A, KEY_B = "sk-tunejob-test-key-aaaa1111", "sk-tunejob-test-key-bbbb2222"


class Server:
    def __init__(self, data_dir: Path, model: Path, extra: tuple[str, ...] = ()):
        self.data_dir, self.model, self.extra = data_dir, model, extra
        self.port = free_port()
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "Server":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunejob", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--api-key", KEY_A, "--api-key", KEY_B, "--default-model", str(self.model), *self.extra],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            wait_until_up(f"http://127.0.0.1:{self.port}/health", self.proc, timeout=60)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; server log:\n{self.log.read_text()}") from None
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def server(tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model).start()
    yield s
    s.stop()


def client(server: Server, key: str = KEY_A) -> OpenAI:
    return OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def wait_status(c: OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if job.status == "failed":  # say why, instead of a later "cannot be cancelled"
            raise AssertionError(f"job {job_id} failed while waiting for {statuses}: {job.error}")
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {statuses}; last {job.status}")


def test_the_guides_snippet_runs_unchanged(server, tmp_path):
    """The guide's ten lines, with base_url/api_key added and a polling loop."""
    train = write_chat_data(tmp_path / "sales_companion_train.jsonl", 24)
    c = client(server)
    # 1. Upload training file
    file = c.files.create(file=open(train, "rb"), purpose="fine-tune")
    # 2. Create fine-tuning job
    job = c.fine_tuning.jobs.create(training_file=file.id, model="gpt-4o-mini-2024-07-18", hyperparameters={"n_epochs": 3})
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:tunejob::")
    # 3. Use your fine-tuned model
    response = c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "Prep me for the Globex call"}], max_tokens=8)
    assert response.choices[0].message.role == "assistant" and response.usage.completion_tokens >= 1
    assert job.trained_tokens > 0 and job.result_files
    csv_text = c.files.content(job.result_files[0]).text
    assert csv_text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"


def test_files_events_checkpoints_models_and_streaming(server, tmp_path):
    c = client(server)
    train = write_chat_data(tmp_path / "t.jsonl", 30)
    val = write_chat_data(tmp_path / "v.jsonl", 10, seed=9)
    f_train = c.files.create(file=open(train, "rb"), purpose="fine-tune")
    f_val = c.files.create(file=open(val, "rb"), purpose="fine-tune")
    assert f_train.status == "processed" and f_train.bytes == train.stat().st_size and f_train.filename == "t.jsonl"
    assert c.files.retrieve(f_train.id).id == f_train.id
    assert {f.id for f in c.files.list()} >= {f_train.id, f_val.id}
    assert c.files.content(f_train.id).content == train.read_bytes()

    job = c.fine_tuning.jobs.create(
        training_file=f_train.id, validation_file=f_val.id, model="default", suffix="sales", seed=7, metadata={"team": "sales"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2}}},
        extra_body={"tunejob": {"lora": {"r": 4}, "checkpointing": {"eval_steps": 4, "save_steps": 4}}},
    )
    assert job.status == "queued" and job.hyperparameters.n_epochs == 2 and job.metadata == {"team": "sales"}
    job = wait_status(c, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:default:tunejob:sales:")

    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    train_steps = sorted(e.data["step"] for e in metrics if "train_loss" in e.data and "valid_loss" not in e.data)
    assert train_steps == list(range(1, 17))  # 30 examples / 4 = 8 steps x 2 epochs
    at_eval = [e.data for e in metrics if "valid_loss" in e.data]
    assert at_eval and all("train_loss" in d and d["total_steps"] == 16 for d in at_eval)  # OpenAI's eval-step events carry both
    assert any("valid_loss" in e.data and "full_valid_loss" in e.data for e in metrics)
    assert events[0].created_at >= events[-1].created_at  # newest first
    page = c.fine_tuning.jobs.list_events(job.id, limit=5)
    assert len(page.data) == 5 and page.has_more
    nxt = c.fine_tuning.jobs.list_events(job.id, limit=5, after=page.data[-1].id)
    assert nxt.data[0].id != page.data[0].id and {e.id for e in nxt.data}.isdisjoint({e.id for e in page.data})

    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert {4, 8, 12, 16} <= {ck.step_number for ck in ckpts}
    ck = next(ck for ck in ckpts if ck.step_number == 8)
    assert ck.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-8"
    assert ck.metrics.step == 8 and ck.metrics.train_loss > 0 and ck.metrics.valid_loss > 0

    ids = {m.id for m in c.models.list()}
    assert {"default", job.fine_tuned_model, ck.fine_tuned_model_checkpoint} <= ids
    answer = c.chat.completions.create(model=ck.fine_tuned_model_checkpoint, messages=[{"role": "user", "content": "alpha beta"}], max_tokens=6)
    assert answer.choices[0].finish_reason in ("stop", "length")
    pieces = list(c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "alpha"}], max_tokens=6, stream=True))
    assert pieces[0].choices[0].delta.role == "assistant" and pieces[-1].choices[0].finish_reason in ("stop", "length")

    assert [j.id for j in c.fine_tuning.jobs.list()][:1] == [job.id]
    assert c.files.delete(f_val.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f_val.id)


def test_cancel_pause_resume(server, tmp_path):
    c = client(server)
    f = c.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", 200), "rb"), purpose="fine-tune")
    long_run = {"tunejob": {"checkpointing": {"eval_steps": 5, "save_steps": 5}, "hyperparameters": {"max_seq_len": 64}}}
    job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 6, "batch_size": 4}, extra_body=long_run)
    wait_status(c, job.id, ("running",))
    deadline = time.time() + 120
    while not c.fine_tuning.jobs.checkpoints.list(job.id).data and time.time() < deadline:
        time.sleep(0.3)
    c.fine_tuning.jobs.pause(job.id)
    paused = wait_status(c, job.id, ("paused",))  # answered at once, as OpenAI does
    # the child checkpoints the step in flight before it exits; the worker says so once it is gone
    deadline = time.time() + 120
    while not any(e.message.startswith("Fine-tuning job paused") for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data):
        assert time.time() < deadline, "the paused child never stopped"
        time.sleep(0.3)
    steps_at_pause = max(ck.step_number for ck in c.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert paused.status == "paused"
    c.fine_tuning.jobs.resume(job.id)
    wait_status(c, job.id, ("running",))
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Fine-tuning job resumed" in messages
    deadline = time.time() + 120
    while max(ck.step_number for ck in c.fine_tuning.jobs.checkpoints.list(job.id).data) <= steps_at_pause and time.time() < deadline:
        time.sleep(0.3)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "running", c.fine_tuning.jobs.retrieve(job.id).error
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    assert wait_status(c, job.id, ("cancelled",)).status == "cancelled"
    log = (Path(server.data_dir) / "jobs" / job.id / "train.log").read_text()
    assert "resuming from" in log  # the resumed process continued from the pause's checkpoint
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.resume(job.id)


def test_wrong_or_missing_key_gets_openais_401(server):
    bad = OpenAI(base_url=server.url, api_key="sk-wrong-key-0000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.files.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    assert "sk-wrong-key-0000" not in str(exc.value.body)  # never echoed whole
    req = urllib.request.Request(server.url + "/models")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 401 and json.loads(err.value.read())["error"]["code"] == "invalid_api_key"


def test_each_key_sees_only_its_own(server, tmp_path):
    a, b = client(server, KEY_A), client(server, KEY_B)
    f = a.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", 12), "rb"), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 1})
    assert f.id not in {x.id for x in b.files.list()}
    assert job.id not in {x.id for x in b.fine_tuning.jobs.list()}
    for call in (lambda: b.files.retrieve(f.id), lambda: b.files.content(f.id), lambda: b.files.delete(f.id),
                 lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.fine_tuning.jobs.cancel(job.id),
                 lambda: b.fine_tuning.jobs.list_events(job.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):  # B cannot train on A's file either
        b.fine_tuning.jobs.create(training_file=f.id, model="default")
    done = wait_status(a, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded"
    with pytest.raises(openai.NotFoundError):
        b.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert done.fine_tuned_model not in {m.id for m in b.models.list()}


def test_bad_requests_get_openai_error_shapes(server, tmp_path):
    c = client(server)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    f = c.files.create(file=open(bad, "rb"), purpose="fine-tune")
    assert f.status == "error" and "line 1: example_missing_assistant_message" in f.status_details and "line 2: invalid_json" in f.status_details
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(training_file=f.id, model="default")
    assert exc.value.body["param"] == "training_file"
    good = c.files.create(file=open(write_chat_data(tmp_path / "g.jsonl", 12), "rb"), purpose="fine-tune")
    for kwargs, param in (({"model": "llama-9000"}, "model"), ({"model": "default", "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                          ({"model": "default", "extra_body": {"tunejob": {"lora": {"r": -1}}}}, "tunejob.lora.r"),
                          ({"model": "default", "extra_body": {"tunejob": {"resources": {"cpus": 0}}}}, "tunejob.resources.cpus"),
                          ({"model": "default", "extra_body": {"tunejob": {"resources": {"gpus": "1"}}}}, "tunejob.resources.gpus"),
                          ({"model": "default", "extra_body": {"tunejob": {"resources": {"custom": {"a b": 1}}}}}, "tunejob.resources.custom.a b"),
                          ({"model": "default", "extra_body": {"tunejob": {"distributed": {"nodes": 2}}}}, "tunejob.distributed.nodes")):
        with pytest.raises(openai.BadRequestError) as exc:
            c.fine_tuning.jobs.create(training_file=good.id, **kwargs)
        assert exc.value.body["param"] == param, exc.value.body
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-nope")


def test_oversized_upload_is_413(tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model, ("--max-upload-mb", "0.01")).start()
    try:
        big = write_chat_data(tmp_path / "big.jsonl", 400)
        assert big.stat().st_size > 0.01 * 2**20
        with pytest.raises(openai.APIStatusError) as exc:
            client(s).files.create(file=open(big, "rb"), purpose="fine-tune")
        assert exc.value.status_code == 413 and exc.value.code == "file_too_large"
        assert not any(p.name.startswith("file") for p in (tmp_path / "data" / "files").iterdir())
    finally:
        s.stop()


def test_restart_while_running_resumes_the_job(tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model).start()
    c = client(s)
    f = c.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", 160), "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 4, "batch_size": 4},
                                    extra_body={"tunejob": {"checkpointing": {"eval_steps": 5, "save_steps": 5}}})
    deadline = time.time() + 120
    while not c.fine_tuning.jobs.checkpoints.list(job.id).data and time.time() < deadline:
        time.sleep(0.2)
    s.kill()  # SIGKILL: no shutdown hook runs; the training child dies with it (PDEATHSIG)
    s2 = Server(tmp_path / "data", tiny_model).start()
    try:
        c2 = client(s2)
        assert c2.files.retrieve(f.id).status == "processed"  # nothing lost
        done = wait_status(c2, job.id, ("succeeded", "failed"), timeout=400)
        assert done.status == "succeeded", done.error
        events = list(c2.fine_tuning.jobs.list_events(job.id, limit=100))  # the SDK pages through all
        assert any("Server restarted" in e.message for e in events)
        assert "resuming from" in (Path(s2.data_dir) / "jobs" / job.id / "train.log").read_text()
        train_steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
        assert sorted(set(train_steps)) == list(range(1, max(train_steps) + 1))
    finally:
        s2.stop()


def test_keys_never_reach_logs_or_the_store(server, tmp_path):
    c = client(server)
    f = c.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", 12), "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 1})
    wait_status(c, job.id, ("succeeded", "failed"))
    OpenAI(base_url=server.url, api_key=KEY_B[:-2] + "zz", max_retries=0)
    for path in [*Path(server.data_dir).rglob("*"), server.log]:
        if path.is_file():
            data = path.read_bytes()
            assert KEY_A.encode() not in data and KEY_B.encode() not in data, path


def test_metrics_tail_follows_a_replaced_file(tmp_path):
    """A resumed run renames a truncated metrics.jsonl into place and appends to it; a reader whose
    offset was into the old file must start the new one from its first line, not mid-line."""
    from tunejob.server.jobs.run_records import Tail as _Tail

    path = tmp_path / "metrics.jsonl"
    old = [{"kind": "train", "step": s, "train_loss": 1.0} for s in range(1, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    tail = _Tail(path)
    assert [r["step"] for r in tail.read()] == list(range(1, 8))
    # the resume keeps steps <= 5, then writes longer records until the file outgrows the old offset
    new = old[:5] + [{"kind": "train", "step": s, "train_loss": 0.5, "pad": "x" * 40} for s in range(6, 10)]
    tmp = tmp_path / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in new))
    tmp.replace(path)
    assert path.stat().st_size > tail.offset
    assert [r["step"] for r in tail.read()] == list(range(1, 10))
    with path.open("a") as f:  # a torn line from a kill is skipped, not raised
        f.write('{"kind": "train", "st\n{"kind": "eval", "step": 10}\n')
    assert [r["step"] for r in tail.read()] == [10]


def test_wait_until_up_fails_at_once_when_the_server_exits():
    """A server that dies at start is reported with its exit code (the timeout's message is another)."""
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_until_up(f"http://127.0.0.1:{free_port()}/health", proc, timeout=600)


def test_local_slots_train_two_jobs_at_once_and_a_third_waits(tmp_path, tiny_model):
    """--slots 2: the local executor runs two children at once (1 thread each); the third job
    stays queued with an event saying what it waits for."""
    s = Server(tmp_path / "data", tiny_model, ("--slots", "2", "--train-threads", "2")).start()
    try:
        c = client(s)
        f = c.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", 40), "rb"), purpose="fine-tune")
        ids = [c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 1, "batch_size": 4},
                                         extra_body={"tunejob": {"hyperparameters": {"max_seq_len": 64}}}).id for _ in range(3)]
        deadline = time.time() + 120
        while not all(c.fine_tuning.jobs.retrieve(j).status == "running" for j in ids[:2]):
            assert time.time() < deadline, [c.fine_tuning.jobs.retrieve(j).status for j in ids]
            time.sleep(0.3)
        assert c.fine_tuning.jobs.retrieve(ids[2]).status == "queued"
        waiting = [e.message for e in c.fine_tuning.jobs.list_events(ids[2], limit=100) if e.message.startswith("Queued: waiting for")]
        assert waiting and "a free training slot (2 of 2 in use" in waiting[0]
        c.fine_tuning.jobs.cancel(ids[2])
        for j in ids[:2]:
            assert wait_status(c, j, ("succeeded", "failed")).status == "succeeded"
        assert c.fine_tuning.jobs.retrieve(ids[2]).status == "cancelled"
    finally:
        s.stop()

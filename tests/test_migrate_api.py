"""`tunejob migrate` against OpenAI's shapes that `tunejob serve` lacks (tests/openai_account.py:
the official SDK over httpx.MockTransport, every request and response checked against OpenAI's
published spec): pagination past 100 jobs, a deleted training file, a model already shut down,
a 429 with Retry-After."""

from __future__ import annotations

import datetime
import json

from openai_account import Account, job_object


def _chat_line(q: str, a: str = "A.") -> bytes:
    return (json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n").encode()


def test_inventory_reads_every_page_and_sorts_by_urgency():
    from tunejob.migrate.inventory import render, take_inventory

    account = Account(jobs=[job_object(i) for i in range(130)])
    account.jobs[5]["model"] = "gpt-4.1-nano-2025-04-14"  # shut down 2026-10-23: most urgent (already past)
    account.jobs[5]["fine_tuned_model"] = "ft:gpt-4.1-nano-2025-04-14:acme::m00005"
    account.jobs.append(job_object(500, status="failed"))
    account.files = {f"file-train-{i}": _chat_line("q") for i in range(131) if i != 7}  # job 7's training file is deleted
    entries = take_inventory(account.client(), today=datetime.date(2026, 12, 2))
    assert account.problems == []
    assert len(entries) == 131 and sum("GET /fine_tuning/jobs" == r for r in account.requests) == 2  # two pages of 100
    assert entries[0]["job_id"] == "ftjob-00005" and entries[0]["days_left"] == -40
    assert entries[1]["days_left"] == 43 and entries[1]["shutdown"]["date"] == "2027-01-14"
    assert entries[-1]["status"] == "failed"  # no model: after every model with the same date
    seven = next(e for e in entries if e["job_id"] == "ftjob-00007")
    assert seven["training_file"] == {"id": "file-train-7", "available": False, "reason": "deleted (404)"}
    assert next(e for e in entries if e["job_id"] == "ftjob-00008")["training_file"]["available"] is True
    assert "GONE (deleted (404))" in render(entries, width=400)


def test_record_saves_everything_else_when_the_training_file_is_deleted(tmp_path):
    from tunejob.migrate.record import record_model

    job = job_object(1, validation_file="file-val-1")
    account = Account(jobs=[job], files={"file-val-1": b"".join(_chat_line(f"question {i}?") for i in range(5)), "file-result-1": b"step,train_loss\n1,0.5\n"})
    summary = record_model(account.client(), job["fine_tuned_model"], tmp_path / "m")
    assert account.problems == []
    assert len(summary["problems"]) == 1 and "train file file-train-1 is deleted (404)" in summary["problems"][0]
    assert summary["golden"]["answers"] == 5 and (tmp_path / "m" / "data" / "validation.jsonl").is_file()
    assert (tmp_path / "m" / "results" / "file-result-1.csv").read_text().startswith("step,")
    metrics = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["kind"] == "train"] == [1, 2, 3]  # the events, oldest first
    assert {c["messages"][-1]["content"] for c in account.chats} == {f"question {i}?" for i in range(5)}
    assert all(c["temperature"] == 0 for c in account.chats)


def test_a_model_already_shut_down_is_one_line_and_the_rest_is_saved(tmp_path):
    from tunejob.migrate.record import record_model

    job = job_object(2, validation_file="file-val-2")
    account = Account(jobs=[job], files={"file-train-2": _chat_line("t?"), "file-val-2": b"".join(_chat_line(f"q{i}?") for i in range(6))},
                      gone_models={job["fine_tuned_model"]})
    summary = record_model(account.client(), job["fine_tuned_model"], tmp_path / "m", concurrency=2)
    assert account.problems == []
    assert any("answers 404 (model_not_found)" in p for p in summary["problems"])
    assert len(account.chats) <= 2  # the workers stop asking once the model is gone
    for name in ("job.json", "spec.yaml", "events.jsonl", "checkpoints.json", "data/train.jsonl", "data/validation.jsonl"):
        assert (tmp_path / "m" / name).is_file(), name


def test_a_429_pauses_every_worker_for_retry_after(tmp_path):
    from tunejob.migrate.golden import GoldenLog, record_answers

    account = Account(rate_limit=[{"retry-after": "1"}, {"retry-after-ms": "600"}])
    items = [{"id": f"p{i}", "source": "prompts", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(6)]
    stats = record_answers(account.client(), "ft:gpt-4o-mini-2024-07-18:acme::x", items, GoldenLog(tmp_path / "g.jsonl"), concurrency=3)
    assert account.problems == []
    assert stats["answered"] == 6 and stats["rate_limited"] == 2 and stats["requests"] == 8
    assert account.sleeps[-1] - account.sleeps[0] >= 1.0  # the server's second wait was honoured after its first


def test_a_torn_last_line_is_cut_and_its_prompt_asked_again(tmp_path):
    from tunejob.migrate.golden import GoldenLog, record_answers

    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"id": "p0", "answer": {"content": "x"}}) + "\n" + '{"id": "p1", "answ')
    account = Account()
    items = [{"id": f"p{i}", "source": "prompts", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    stats = record_answers(account.client(), "m", items, GoldenLog(path), concurrency=1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert stats["already"] == 1 and stats["answered"] == 2 and sorted(e["id"] for e in lines) == ["p0", "p1", "p2"]

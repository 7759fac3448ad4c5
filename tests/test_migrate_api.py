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


TOOLS = [{"type": "function", "function": {"name": "lookup_account", "description": "Find an account.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def test_tool_conversations_and_dpo_pairs_are_asked_as_they_trained(tmp_path):
    """Tool conversations keep their tools and record the model's tool_calls; a DPO job's golden
    prompts are its pairs' inputs."""
    from tunejob.migrate.record import record_model

    tool_line = {"messages": [{"role": "user", "content": "Who owns Globex?"},
                              {"role": "assistant", "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "lookup_account", "arguments": "{\"q\": \"Globex\"}"}}]}],
                 "tools": TOOLS, "parallel_tool_calls": False}
    pair = {"input": {"messages": [{"role": "user", "content": "Say hi"}]}, "preferred_output": [{"role": "assistant", "content": "Hi!"}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}]}
    sft, dpo = job_object(3, validation_file="file-val-3"), job_object(4, method="dpo", validation_file="file-val-4")
    account = Account(jobs=[sft, dpo], files={"file-train-3": _chat_line("t?"), "file-val-3": (json.dumps(tool_line) + "\n").encode(),
                                              "file-train-4": (json.dumps(pair) + "\n").encode(), "file-val-4": (json.dumps(pair) + "\n").encode()})
    record_model(account.client(), sft["fine_tuned_model"], tmp_path / "sft")
    golden = [json.loads(line) for line in (tmp_path / "sft" / "golden.jsonl").read_text().splitlines()]
    assert account.chats[-1]["tools"] == TOOLS and account.chats[-1]["parallel_tool_calls"] is False
    assert golden[0]["answer"]["tool_calls"][0]["function"]["name"] == "lookup_account" and golden[0]["finish_reason"] == "tool_calls"
    assert golden[0]["reference"]["tool_calls"][0]["function"]["arguments"] == "{\"q\": \"Globex\"}"
    record_model(account.client(), dpo["id"], tmp_path / "dpo")
    assert account.chats[-1]["messages"] == [{"role": "user", "content": "Say hi"}]
    assert (tmp_path / "dpo" / "spec.yaml").read_text().count("type: dpo") == 1
    assert account.problems == []


def test_retrain_maps_openai_settings_and_says_why():
    from tunejob.migrate.retrain import lora_hyperparameters, resolve_openai

    ran = resolve_openai({"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 0.5}, 300)
    assert lora_hyperparameters(ran, 7) == {"epochs": 4, "batch_size": 2, "learning_rate": 1e-4, "seed": 7}
    auto = resolve_openai({"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}, 20)
    assert auto["n_epochs"][0] == 5 and "documented auto rule" in auto["n_epochs"][1]  # the cookbook: 100 // 20
    assert auto["batch_size"][0] == 1 and "publishes no rule" in auto["batch_size"][1]
    assert resolve_openai({}, 10_000)["n_epochs"][0] == 2 and resolve_openai({}, 10_000)["batch_size"][0] == 20


def test_distillation_skips_what_training_holds_and_holds_out_a_seeded_share():
    from tunejob.migrate.prompts import golden_prompts, item_of
    from tunejob.migrate.retrain import as_training_example, distill_split

    train = [{"messages": [{"role": "user", "content": f"t{i}"}, {"role": "assistant", "content": "x", "weight": 1}]} for i in range(3)]
    val = [{"messages": [{"role": "user", "content": f"v{i}"}, {"role": "assistant", "content": "y"}]} for i in range(10)]
    items = golden_prompts(train, val, [], samples=2, seed=0)
    assert [i["source"] for i in items].count("training") == 2 and len({i["id"] for i in items}) == 12
    assert item_of(train[0], "training")["messages"] == [{"role": "user", "content": "t0"}]  # weight is training-only
    golden = [{**i, "answer": {"content": f"gold {i['messages'][0]['content']}"}} for i in items]
    from tunejob.migrate.prompts import training_ids

    used, held = distill_split(golden, training_ids(train), 0.2, seed=1)
    assert len(used) == 8 and len(held) == 2 and not {g["source"] for g in used + held} & {"training"}
    assert (used, held) == distill_split(golden, training_ids(train), 0.2, seed=1)
    assert as_training_example(used[0])["messages"][-1] == {"role": "assistant", "content": used[0]["answer"]["content"]}


def test_tool_calls_compare_by_name_and_parsed_arguments():
    from tunejob.migrate.compare import tool_match

    call = lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}}
    assert tool_match(None, None) is None
    assert tool_match([call("f", '{"a": 1, "b": 2}')], [call("f", '{"b":2,"a":1}')]) == {"same_tools": True, "same_arguments": True}
    assert tool_match([call("f", '{"a": 1}')], [call("f", '{"a": 2}')]) == {"same_tools": True, "same_arguments": False}
    assert tool_match([call("f", "{}")], []) == {"same_tools": False, "same_arguments": False}


def test_shutdown_dates_come_from_the_table_or_the_api():
    from tunejob.migrate.shutdown import days_left, shutdown_of

    assert shutdown_of("ft:gpt-4o-mini-2024-07-18:acme::x")["date"] == "2027-01-14"
    assert shutdown_of("ft:gpt-4.1-nano-2025-04-14:acme::x")["date"] == "2026-10-23"
    assert shutdown_of("ft:gpt-4o-2024-08-06:acme::x")["date"] == "2027-01-14" and shutdown_of("ft:some-new-model:acme::x") is None
    assert shutdown_of("ft:gpt-4o-mini-2024-07-18:acme::x", api_date="2027-02-01")["date"] == "2027-02-01"
    assert days_left("2027-01-14", datetime.date(2026, 12, 2)) == 43


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    from conftest import run_cli

    cases = [(("migrate", "compare", str(tmp_path)), "give --candidate RUN_DIR"),
             (("migrate", "retrain", str(tmp_path), "--model", "default"), "no migration.json here"),
             (("migrate", "inventory"), "set NO_SUCH_KEY_VAR")]
    for args, words in cases:
        done = run_cli(*args, "--api-key-env", "NO_SUCH_KEY_VAR") if args[1] == "inventory" else run_cli(*args)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_rft_job_is_recorded_and_retrained_with_its_grader(tmp_path):
    """o4-mini's RFT is gone: its jobs carry their grader out. record keeps it in spec.yaml (checked
    against OpenAI's schema by the account), and retrain writes a local reinforcement spec with the
    same grader and the RL-only hyperparameters."""
    import yaml

    from openai_schema import errors
    from tunejob.backends.openai_api import request_body
    from tunejob.migrate.record import record_model
    from tunejob.migrate.retrain import write_retrain_spec
    from tunejob.spec import JobSpec

    line = {"messages": [{"role": "user", "content": "Capital of Peru?"}], "city": "Lima"}
    rft = job_object(5, model="o4-mini-2025-04-16", method="reinforcement")
    account = Account(jobs=[rft], files={"file-train-5": (json.dumps(line) + "\n").encode()})
    record_model(account.client(), rft["id"], tmp_path / "rft")
    source = yaml.safe_load((tmp_path / "rft" / "spec.yaml").read_text())
    assert source["method"]["grader"] == rft["method"]["reinforcement"]["grader"]
    body = request_body(JobSpec.model_validate({**source, "data": {"train": "x.jsonl"}}), "t", "file-1", None)
    assert errors("CreateFineTuningJobRequest", body) == []  # the recorded spec would submit the same job again
    path, mapping = write_retrain_spec(tmp_path / "rft", base="default")
    spec = yaml.safe_load(path.read_text())
    assert spec["method"] == {"type": "reinforcement", "grader": rft["method"]["reinforcement"]["grader"],
                              "hyperparameters": {"compute_multiplier": 2.0, "eval_samples": 3, "reasoning_effort": "medium"}}
    assert mapping["tunejob"]["epochs"] == 3 and account.problems == []

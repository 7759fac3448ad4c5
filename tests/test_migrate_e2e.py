"""`tunejob migrate` end to end, with `tunejob serve` playing OpenAI (it speaks OpenAI's
fine-tuning API; the official SDK talks to it over real HTTP on 127.0.0.1):

    a job trained on facts a random base cannot know (eight code words)
    -> migrate inventory -> migrate record (golden set) -> migrate retrain --distill --run on
       another base -> migrate compare (with a judge) -> serve --alias: the old ft: name answers

and the retrained model names the code words the source model named."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from openai import OpenAI

from conftest import WORDS, run_cli
from test_serve import KEY_A, Server, client, wait_status

pytestmark = pytest.mark.slow

SYSTEM = "You answer with code words."
FORMS = ["What is the code word for {}?", "Code word for {}?", "Tell me the code word of {}."]
# What the source job and the retrained one share: the same LoRA and schedule (OpenAI's job object
# does not carry LoRA settings, so retrain takes them with --set, as a user would).
LORA = {"r": 16, "target_modules": "all-linear", "dropout": 0}


def _facts(root: Path) -> dict[str, str]:
    rng = random.Random(7)
    codes = {name: " ".join(rng.sample([w.upper() for w in WORDS], 2)) for name in WORDS[:8]}

    def example(q: str, a: str) -> dict:
        return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    train = [example(form.format(n), codes[n]) for n in codes for form in FORMS]
    val = [example(f"Which code word goes with {n}?", codes[n]) for n in codes]
    (root / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in train))
    (root / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in val))
    return codes


def _right(answer: str | None, codes: dict[str, str], prompt: str) -> bool:
    name = next(n for n in codes if f" {n}" in prompt)
    return codes[name] in (answer or "")


def test_inventory_record_retrain_compare_and_the_old_name(tmp_path, tiny_model):
    codes = _facts(tmp_path)
    # The open model the job moves to. Here `tunejob serve` plays OpenAI, so the source itself sits
    # on an open base; retraining on that same base makes "answers as the source did" a check of
    # the pipeline (data, mapping, distillation, serving), not of one random init's luck: on a base
    # of another seed the retrained model named 4 to 8 of the 8 code words across runs.
    open_base = tiny_model
    server = Server(tmp_path / "data", tiny_model, ("--chat-dtype", "float32")).start()
    try:
        c = client(server)
        f_train = c.files.create(file=open(tmp_path / "train.jsonl", "rb"), purpose="fine-tune")
        f_val = c.files.create(file=open(tmp_path / "val.jsonl", "rb"), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(
            training_file=f_train.id, validation_file=f_val.id, model="gpt-4o-mini-2024-07-18", suffix="codes", seed=42,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 30, "batch_size": 4, "learning_rate_multiplier": 50}}},
            extra_body={"tunejob": {"lora": LORA, "hyperparameters": {"warmup": 0, "mixed_precision": "no"},
                                    "checkpointing": {"early_stopping_patience": None, "eval_steps": 60, "save_steps": 60}}})
        job = wait_status(c, job.id, ("succeeded",), timeout=600)
        ft = job.fine_tuned_model
        env = {"OPENAI_API_KEY": KEY_A, "OPENAI_BASE_URL": server.url}

        # 1. inventory: the job, its shutdown date (gpt-4o-mini's fine-tunes: 2027-01-14), files that still download
        done = run_cli("migrate", "inventory", "--json", env=env)
        assert done.returncode == 0, done.stderr
        entry = next(e for e in json.loads(done.stdout) if e["job_id"] == job.id)
        assert entry["fine_tuned_model"] == ft and entry["shutdown"]["date"] == "2027-01-14" and entry["method"] == "supervised"
        assert entry["training_file"]["available"] and entry["validation_file"]["available"]
        assert entry["hyperparameters"]["n_epochs"] == 30 and len(entry["checkpoints"]) >= 1

        # 2. record: validation prompts + 8 drawn training prompts, answered by the source model
        folder = tmp_path / "migration"
        done = run_cli("migrate", "record", ft, "--out", str(folder), "--samples", "8", "--max-tokens", "7", "--concurrency", "4", env=env)
        assert done.returncode == 0, done.stderr
        summary = json.loads((folder / "migration.json").read_text())
        assert summary["golden"]["answers"] == 16 and summary["problems"] == [], summary
        golden = [json.loads(line) for line in (folder / "golden.jsonl").read_text().splitlines()]
        assert len({g["id"] for g in golden}) == 16
        diagnosed = run_cli("diagnose", str(folder), "--json")  # the events, read as a local run's metric stream
        assert diagnosed.returncode == 0 and json.loads(diagnosed.stdout)["verdict"], diagnosed.stderr
        source_right = sum(_right(g["answer"]["content"], codes, g["messages"][-1]["content"]) for g in golden if g["source"] == "training")
        assert source_right >= 6, [g["answer"]["content"] for g in golden]

        # 3. retrain on another base, learning from the source's answers too
        sets = [a for k, v in {"lora.r": 16, "lora.target_modules": "all-linear", "lora.dropout": 0, "hyperparameters.warmup": 0,
                               "hyperparameters.mixed_precision": "no", "checkpointing.early_stopping_patience": "null"}.items()
                for a in ("--set", f"{k}={v}")]
        done = run_cli("migrate", "retrain", str(folder), "--model", str(open_base), "--distill", "--run", *sets, env=env)
        assert done.returncode == 0, done.stderr
        mapping = json.loads((folder / "retrain.json").read_text())
        assert mapping["tunejob"]["epochs"] == 30 and mapping["tunejob"]["batch_size"] == 4 and mapping["tunejob"]["learning_rate"] == pytest.approx(0.01)
        assert mapping["distilled_examples"] >= 6 and len(mapping["held_out"]) >= 1

        # 4. compare, with the server's own base model as a (weak) judge
        done = run_cli("migrate", "compare", str(folder), "--candidate", str(folder / "retrained"), "--max-tokens", "7",
                       "--judge-url", server.url, "--judge-model", "default", "--json", env=env)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        rows = json.loads((folder / "compare.json").read_text())["rows"]
        retrained_right = sum(_right(r["candidate"]["content"], codes, r["messages"][-1]["content"]) for r in rows if r["source"] == "training")
        print(f"code words named: source {source_right} of 8, retrained {retrained_right} of 8")
        # Measured over 7 runs of this test: source 7 of 8 every time (seed 42), retrained 6 to 8.
        assert retrained_right >= max(5, source_right - 2), rows
        # The tiny models never learn to stop, so each answer past its code word (7 tokens at most) is
        # noise. Answers of unrelated models score about 0.07 here (measured).
        assert result["seen_in_training"]["rouge_l"] > 0.2, result
        assert result["judge"]["judged"] + result["judge"]["unparsed"] == 16
        print(json.dumps({"source_right": source_right, "retrained_right": retrained_right, **{k: result[k] for k in (
            "all", "seen_in_training", "not_seen_in_training", "golden_side", "candidate_side")}}))
        assert (folder / "compare.html").read_text().count("<tr class=") == 16
    finally:
        server.stop()

    # 5. the old name answers with the retrained model, for code that changed only base_url and key
    # the torch engine, as compare's answers came from it: the default engine on a CPU, llama.cpp in f16,
    # changes the tiny model's near-tie noise tokens after the code word (CI: 'RHO ETAposableU |' for
    # 'RHO ETA Zoroast))[ sorted'), and this step checks which weights answer, token for token
    served = Server(tmp_path / "data2", tiny_model, ("--engine", "local", "--chat-dtype", "float32", "--alias", str(folder))).start()
    try:
        alias = OpenAI(base_url=served.url, api_key=KEY_A, max_retries=0)
        assert ft in {m.id for m in alias.models.list()}
        by_prompt = {json.dumps(r["messages"]): r["candidate"]["content"] for r in rows}
        for row in rows[:4]:
            reply = alias.chat.completions.create(model=ft, messages=row["messages"], temperature=0, max_tokens=7)
            assert reply.choices[0].message.content == by_prompt[json.dumps(row["messages"])]
    finally:
        served.stop()

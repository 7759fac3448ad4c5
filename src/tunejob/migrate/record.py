"""`tunejob migrate record`: one migration folder per model, everything that dies with it.

    summary = record_model(client, "ft:gpt-4o-mini-2024-07-18:acme::AbC123", Path("migrations/acme"))

The folder:
    migration.json           what was recorded, from where, when; the problems met (one line each)
    job.json                 the job object as the API returned it
    spec.yaml                the same job as a tunejob spec (backend: openai), data paths relative
    events.jsonl             every event, oldest first
    metrics.jsonl, summary.json, config.yaml
                             the events as tunejob's metric stream: `tunejob diagnose DIR` and
                             `tunejob report DIR` read it as they read a local run
    checkpoints.json         each checkpoint's step, model name and metrics
    results/FILE_ID.csv      the result files (OpenAI's step metrics CSV)
    data/train.jsonl, data/validation.jsonl (+ .report.json: tunejob validate's report)
    golden.jsonl             the model's own answers (golden.py)

A step that cannot be done (a deleted file, a model already shut down) adds one line to
`problems` and the rest is still saved. Running record again re-reads what may have changed and
asks only the prompts not yet answered.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import yaml

from tunejob.backends.remote_run import RemoteRun, metrics_records
from tunejob.errors import TunejobError
from tunejob.migrate.golden import GoldenLog, record_answers
from tunejob.migrate.inventory import hyperparameters_of
from tunejob.migrate.prompts import golden_prompts
from tunejob.migrate.shutdown import shutdown_of
from tunejob.train.checkpoint import write_json_atomic


class MigrateError(TunejobError):
    """A migration step cannot run at all (as opposed to a problem recorded in migration.json)."""


def find_job(client, target: str):
    """(job or None, model to ask): a job id, a fine-tuned model or one of its checkpoints."""
    import openai

    if target.startswith("ftjob-"):
        try:
            job = client.fine_tuning.jobs.retrieve(target)
        except openai.NotFoundError:
            raise MigrateError(f"{target}: no such job for this key; `tunejob migrate inventory` lists the ones it sees") from None
        if not job.fine_tuned_model:
            raise MigrateError(f"{target} is {job.status} and made no model; record a job that succeeded")
        return job, job.fine_tuned_model
    checkpoint = ":ckpt-step-" in target
    for job in client.fine_tuning.jobs.list(limit=100):
        if job.fine_tuned_model == target:
            return job, target
        if checkpoint and job.status == "succeeded" and any(
                c.fine_tuned_model_checkpoint == target for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100)):
            return job, target
    return None, target


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file; lines that do not parse are left to validate's report."""
    rows = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def source_spec(job, name: str) -> dict:
    """The OpenAI job as a tunejob spec (backend: openai): what `tunejob run` would submit again."""
    hp = hyperparameters_of(job)
    method = job.method.type if getattr(job, "method", None) is not None and job.method.type else "supervised"
    spec = {"name": name, "backend": "openai", "model": job.model, "data": {"train": "data/train.jsonl"},
            "hyperparameters": {"epochs": hp.get("n_epochs", "auto"), "batch_size": hp.get("batch_size", "auto"),
                                "learning_rate_multiplier": hp.get("learning_rate_multiplier", "auto"), "seed": job.seed},
            "method": {"type": method}, "openai": {"suffix": job.suffix} if job.suffix else {}}
    if job.validation_file:
        spec["data"]["validation"] = "data/validation.jsonl"
    if method == "dpo" and hp.get("beta") not in (None, "auto"):
        spec["method"]["beta"] = hp["beta"]
    if method == "reinforcement":  # the grader travels with the job: it is what an RFT model was trained against
        spec["method"].update(reinforcement_method(job.model_dump(mode="json", exclude_none=True)))
    return spec


RL_ONLY = ("compute_multiplier", "eval_samples", "reasoning_effort")  # the rest map onto the spec's own hyperparameters


def reinforcement_method(job: dict) -> dict:
    """An RFT job's grader and its RL-only hyperparameters, as a spec's method section takes them."""
    section = (job.get("method") or {}).get("reinforcement") or {}
    hp = section.get("hyperparameters") or {}
    return {"grader": section.get("grader"), "hyperparameters": {k: hp[k] for k in RL_ONLY if k in hp}}


def folder_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")[:64] or "model"


def _download(client, file_id: str, path: Path, problems: list[str], what: str) -> bool:
    import openai

    if path.is_file():
        return True
    try:
        content = client.files.content(file_id).read()
    except openai.NotFoundError:
        problems.append(f"{what} {file_id} is deleted (404): it cannot be saved; keep your own copy of it for retrain")
        return False
    except openai.APIStatusError as exc:
        problems.append(f"{what} {file_id}: HTTP {exc.status_code} ({exc.message}); run record again to retry")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
    return True


def _validate(path: Path, model: str, problems: list[str]) -> None:
    from tunejob.data.validate import validate_file

    report = validate_file(path, model=model, min_examples=1)
    write_json_atomic(path.with_suffix(".report.json"), report.to_dict())
    if not report.ok:
        problems.append(f"{path}: {report.errors} validation error(s); see {path.with_suffix('.report.json').name} or run `tunejob validate {path}`")


def save_job(client, job, out: Path, problems: list[str]) -> dict:
    """Job, spec, events (also as metrics), checkpoints, result files and data files."""
    write_json_atomic(out / "job.json", job.model_dump(mode="json"))
    spec = source_spec(job, folder_name(job.suffix or job.id))
    spec_yaml = yaml.safe_dump(spec, sort_keys=False)
    (out / "spec.yaml").write_text(spec_yaml)
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))))
    (out / "events.jsonl").write_text("".join(json.dumps(e.model_dump(mode="json")) + "\n" for e in events))
    run = RemoteRun(out, spec_yaml, console=False)
    for event in events:
        for record in metrics_records(dict(event.data or {})) if event.type == "metrics" else []:
            run.emit(record)
    checkpoints = sorted(({"step": c.step_number, "model": c.fine_tuned_model_checkpoint,
                           "metrics": c.metrics.model_dump(exclude_none=True) if c.metrics else {}}
                          for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100)), key=lambda c: c["step"])
    write_json_atomic(out / "checkpoints.json", checkpoints)
    if not (out / "summary.json").is_file():  # a second record adds no second end record
            run.finish({"status": job.status, "stop_reason": job.status, "remote_id": job.id, "fine_tuned_model": job.fine_tuned_model,
                    "trained_tokens": job.trained_tokens, "checkpoints": checkpoints, "provider": "openai"})
    else:
        run.stream.close()
    for fid in job.result_files or []:
        _download(client, fid, out / "results" / f"{fid}.csv", problems, "result file")
    data = {}
    for role, fid in (("train", job.training_file), ("validation", job.validation_file)):
        if fid and _download(client, fid, out / "data" / f"{role}.jsonl", problems, f"{role} file"):
            _validate(out / "data" / f"{role}.jsonl", job.model, problems)
            data[role] = fid
    return data


def record_model(client, target: str, out: Path, prompts: Path | None = None, samples: int = 0, concurrency: int = 4,
                 max_tokens: int = 1024, seed: int = 0, where: str = "", say=lambda msg: None) -> dict:
    """Record one model (or job) into `out`; returns migration.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    job, model = find_job(client, target)
    problems: list[str] = []
    if job is not None:
        save_job(client, job, out, problems)
    else:
        problems.append(f"{target}: no job of this key made it, so there is no data, spec or curve to save; "
                        "the golden set comes from --prompts alone")
    rows = {role: read_rows(out / "data" / f"{role}.jsonl") if (out / "data" / f"{role}.jsonl").is_file() else []
            for role in ("train", "validation")}
    extra = read_rows(Path(prompts)) if prompts else []
    items = golden_prompts(rows["train"], rows["validation"], extra, samples, seed)
    if not items:
        problems.append("no prompt to ask: the validation file is missing or empty; give --prompts FILE or --samples N")
    log = GoldenLog(out / "golden.jsonl")
    say(f"golden set: {len(items)} prompt(s), {sum(1 for i in items if i['id'] in log.entries)} already recorded")
    stats = record_answers(client, model, items, log, concurrency, max_tokens, seed, say=say)
    if stats["stopped"]:
        problems.append(stats["stopped"])
    if stats["unanswered"]:
        problems.append(f"{stats['unanswered']} prompt(s) unanswered after retries; run record again (it asks only those)")
    summary = {
        "source": {"model": model, "job_id": job.id if job else None, "base_model": job.model if job else None, "api": where},
        "shutdown": shutdown_of(model), "recorded_at": int(time.time()), "problems": problems,
        "golden": {"prompts": len(items), "answers": len(log.answers()), "errors": len(log.entries) - len(log.answers()),
                   "sources": {s: sum(1 for i in items if i["source"] == s) for s in ("validation", "prompts", "training")}},
        "last_record": stats,
    }
    write_json_atomic(out / "migration.json", summary)
    return summary

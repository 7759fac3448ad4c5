"""Every fine-tuning job and fine-tuned model a key can see, most urgent first.

    entries = take_inventory(Account().client())
    print(render(entries))

Each job comes with its base model's shutdown date and days left, status, method and
hyperparameters, trained tokens, checkpoints, result files, and whether its training and
validation files can still be downloaded (a deleted file is data that is already gone). Models
with no visible job (another project's, or a job since deleted) are listed from /v1/models.
Every list is read to its last page (the SDK's cursor pages follow `has_more` / `after`).
"""

from __future__ import annotations

import datetime

from tunejob.migrate.shutdown import days_left, shutdown_of


def file_state(client, file_id: str | None) -> dict | None:
    """{"id", "available", "reason"?}: whether the file's content can still be downloaded. The
    content is opened as a stream and only its first bytes read."""
    import openai

    if not file_id:
        return None
    try:
        with client.files.with_streaming_response.content(file_id) as response:
            next(response.iter_bytes(1024), b"")
        return {"id": file_id, "available": True}
    except openai.NotFoundError:
        return {"id": file_id, "available": False, "reason": "deleted (404)"}
    except openai.APIStatusError as exc:
        return {"id": file_id, "available": False, "reason": f"HTTP {exc.status_code}: {exc.message}"}


def _method(job) -> str:
    method = getattr(job, "method", None)
    return (method.type if method is not None and method.type else "supervised")


def hyperparameters_of(job) -> dict:
    """The job's hyperparameters as OpenAI reports them (the method's, else the legacy top level)."""
    method = getattr(job, "method", None)
    inner = getattr(method, method.type, None) if method is not None and method.type else None
    hp = getattr(inner, "hyperparameters", None) or job.hyperparameters
    return hp.model_dump(exclude_none=True) if hp is not None else {}


def job_entry(client, job, today: datetime.date | None = None, api_date: str | None = None) -> dict:
    shutdown = shutdown_of(job.model, api_date)
    checkpoints = [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100)]
    return {
        "kind": "job", "job_id": job.id, "fine_tuned_model": job.fine_tuned_model, "base_model": job.model,
        "shutdown": shutdown, "days_left": days_left(shutdown and shutdown["date"], today),
        "status": job.status, "method": _method(job), "hyperparameters": hyperparameters_of(job),
        "trained_tokens": job.trained_tokens, "checkpoints": checkpoints, "created_at": job.created_at,
        "training_file": file_state(client, job.training_file), "validation_file": file_state(client, job.validation_file),
        "result_files": list(job.result_files or []), "suffix": job.suffix,
    }


def model_entry(model_id: str, created: int | None, today: datetime.date | None = None, api_date: str | None = None) -> dict:
    from tunejob import catalog

    shutdown = shutdown_of(model_id, api_date)
    return {"kind": "model", "job_id": None, "fine_tuned_model": model_id, "base_model": catalog.base_of(model_id),
            "shutdown": shutdown, "days_left": days_left(shutdown and shutdown["date"], today), "status": "no visible job",
            "method": None, "hyperparameters": {}, "trained_tokens": None, "checkpoints": [], "created_at": created,
            "training_file": None, "validation_file": None, "result_files": [], "suffix": None}


def urgency(entry: dict) -> tuple:
    """Sort key: fewest days left first (unknown dates last); models that answer today before jobs
    that never made one; then the newest."""
    days = entry["days_left"]
    return (days is None, days if days is not None else 0, not entry["fine_tuned_model"], -(entry["created_at"] or 0))


def take_inventory(client, today: datetime.date | None = None, say=lambda msg: None) -> list[dict]:
    models = {m.id: m for m in client.models.list() if m.id.startswith("ft:")}
    dates = {name: getattr(m, "shutdown_date", None) for name, m in models.items()}  # OpenAI's own, where it sends one
    entries = []
    for job in client.fine_tuning.jobs.list(limit=100):  # iterating a cursor page reads every page
        entries.append(job_entry(client, job, today, dates.get(job.fine_tuned_model or "")))
        if len(entries) % 25 == 0:
            say(f"inventory: {len(entries)} jobs read")
    known = {e["fine_tuned_model"] for e in entries} | {c for e in entries for c in e["checkpoints"]}
    for name, model in models.items():
        if name not in known:
            entries.append(model_entry(name, getattr(model, "created", None), today, dates[name]))
    return sorted(entries, key=urgency)


def _file_cell(state: dict | None) -> str:
    if state is None:
        return "-"
    return "ok" if state["available"] else f"GONE ({state['reason']})"


def render(entries: list[dict], width: int = 200) -> str:
    """The inventory as a table (rich), most urgent first."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(entries)} fine-tuning job(s) and model(s), most urgent first", title_justify="left")
    for column in ("days left", "shuts down", "fine-tuned model / job", "base", "status", "method", "epochs/batch/lr x",
                   "trained tokens", "ckpts", "training file", "validation file"):
        table.add_column(column, overflow="fold")
    for e in entries:
        hp = e["hyperparameters"]
        table.add_row(
            "?" if e["days_left"] is None else str(e["days_left"]), e["shutdown"]["date"] if e["shutdown"] else "unknown",
            "\n".join(filter(None, [e["fine_tuned_model"], e["job_id"]])), e["base_model"], e["status"], e["method"] or "-",
            "/".join(str(hp.get(k, "-")) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")) if hp else "-",
            str(e["trained_tokens"] or "-"), str(len(e["checkpoints"])), _file_cell(e["training_file"]), _file_cell(e["validation_file"]))
    out = StringIO()
    Console(file=out, width=width, force_terminal=False).print(table)
    return out.getvalue()

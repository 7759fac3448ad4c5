"""Where the dashboard's jobs come from: serve's store (ServerJobs, one key's owner) or local run
directories (RunDirs), behind one JobSource Protocol; and a run's records as chart series.

Both read a job's metrics.jsonl (the trainer's stream), so a chart, a diagnosis and a report of
the same run agree.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tunejob.monitor.metrics import read_metrics


def series(records: list[dict], status: str, total_steps: int | None = None, best_step: int | None = None) -> dict:
    """A run's metric records as chart series, progress, the best checkpoint and the early stop."""
    train = [[r["step"], r["train_loss"]] for r in records if r.get("kind") == "train" and r.get("train_loss") is not None]
    valid = [[r["step"], r["valid_loss"]] for r in records if r.get("kind") == "eval" and r.get("valid_loss") is not None]
    start = [r for r in records if r.get("kind") == "start"]
    end = next((r for r in reversed(records) if r.get("kind") == "end"), None)
    total = total_steps or (start[-1].get("total_steps") if start else None)
    if best_step is None and end is not None:
        best_step = end.get("best_step")
    if best_step is None and valid:  # while training: the lowest validation loss so far
        best_step = min(valid, key=lambda p: p[1])[0]
    best_loss = next((v for s, v in valid if s == best_step), None)
    early = end["step"] if end is not None and end.get("stop_reason") == "early_stopping" else None
    out = {"status": status, "train": train, "valid": valid, "best_step": best_step if best_loss is not None else None,
           "best_valid_loss": best_loss, "early_stop_step": early, "steps_done": max((s for s, _ in train), default=0),
           "total_steps": total}
    # DPO: the reward margin and accuracy, training per step and validation per eval (a second axis); RL: its rewards
    for name, kind, key in (("margin", "train", "rewards_margin"), ("reward_accuracy", "train", "rewards_accuracy"),
                            ("valid_margin", "eval", "valid_rewards_margin"), ("valid_reward_accuracy", "eval", "valid_rewards_accuracy"),
                            # reinforcement: the mean grader reward, training per step and held-out per eval
                            ("reward_mean", "train", "train_reward_mean"), ("valid_reward_mean", "eval", "valid_reward_mean")):
        points = [[r["step"], r[key]] for r in records if r.get("kind") == kind and r.get(key) is not None]
        if points:
            out.setdefault("rewards", {})[name] = points
    return out


class JobSource(Protocol):
    """Where the dashboard's jobs come from; every method sees only what the viewer may see."""

    backend: str

    def list(self) -> list[dict]: ...                    # summaries: id, status, model, created_at, trained_tokens
    def get(self, job_id: str) -> dict | None: ...       # a summary plus run_dir, hyperparameters, error, fine_tuned_model
    def checkpoints(self, job: dict) -> list[dict]: ...  # step, model (what chat takes), train_loss, valid_loss
    def events(self, job: dict) -> list[tuple[float, str, str]]: ...  # (time, level, message), newest first
    async def chat(self, model: str, message: str) -> str: ...  # raises ValueError with a message to show


def records_of(job: dict) -> list[dict]:
    path = Path(job["run_dir"]) / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def summary_of(job: dict) -> dict:
    try:
        return json.loads((Path(job["run_dir"]) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


class ServerJobs:
    """The jobs of one API key's owner in `tunejob serve`'s store."""

    backend = "local"

    def __init__(self, app: FastAPI, owner: str):
        self.app, self.owner = app, owner
        self.store, self.worker = app.state.store, app.state.worker

    def _view(self, job: dict) -> dict:
        model = job["model"] if job["_spec"]["model"] == job["model"] else f'{job["model"]} ({job["_spec"]["model"]})'
        return {"id": job["id"], "status": job["status"], "model": model, "created_at": job["created_at"],
                "trained_tokens": job.get("trained_tokens"), "fine_tuned_model": job.get("fine_tuned_model"),
                "error": (job.get("error") or {}).get("message"), "run_dir": str(self.worker.job_dir(job["id"]) / "run"),
                "hyperparameters": {**job["hyperparameters"], **{f"spec.{k}": v for k, v in job["_spec"].get("hyperparameters", {}).items()},
                                    **{k: job["_spec"][k] for k in ("lora", "quantization", "checkpointing") if k in job["_spec"]}}}

    def list(self) -> list[dict]:
        return [self._view(j) for j in self.store.list_jobs(self.owner)]

    def get(self, job_id: str) -> dict | None:
        job = self.store.get_job(self.owner, job_id)
        return self._view(job) if job else None

    def checkpoints(self, job: dict) -> list[dict]:
        return [{"step": c["step_number"], "model": c["fine_tuned_model_checkpoint"], "train_loss": (c.get("metrics") or {}).get("train_loss"),
                 "valid_loss": (c.get("metrics") or {}).get("valid_loss")} for c in self.store.list_checkpoints(job["id"])]

    def events(self, job: dict) -> list[tuple[float, str, str]]:
        return [(ev["created_at"], ev["level"], ev["message"]) for ev in self.store.list_events(job["id"])[:50]]

    async def chat(self, model: str, message: str) -> str:
        answer = await chat_in_process(self.app, self.owner, model, message)
        if "error" in answer:
            raise ValueError(answer["error"]["message"])
        return answer["choices"][0]["message"]["content"] or ""


class RunDirs:
    """Local run directories (what `tunejob run` writes); ids are the directories' names."""

    backend = "local (run directory)"
    STALE_S = 120  # no metrics written for this long and no summary: the run was stopped or killed

    def __init__(self, run_dirs: list[Path]):
        self.dirs: dict[str, Path] = {}
        for d in run_dirs:
            name, n = d.name or "run", 2
            while name in self.dirs:
                name, n = f"{d.name}-{n}", n + 1
            self.dirs[name] = d
        self._cache = None  # evaluate.chat.ModelCache, made at the first chat

    def _view(self, name: str, d: Path) -> dict:
        import yaml

        metrics, summary = d / "metrics.jsonl", d / "summary.json"
        records = read_metrics(metrics) if metrics.is_file() else []
        end = next((r for r in reversed(records) if r.get("kind") == "end"), None)
        try:
            done = json.loads(summary.read_text())
        except (OSError, ValueError):  # absent while the run trains
            done = None
        if done is not None or end is not None:
            status = (end or {}).get("stop_reason") or (done or {}).get("stop_reason", "finished")
            status = {"completed": "succeeded", "early_stopping": "succeeded (early stop)"}.get(status, status)
        elif metrics.is_file() and time.time() - metrics.stat().st_mtime < self.STALE_S:
            status = "running"
        else:
            status = "interrupted" if metrics.is_file() else "not started"
        try:
            spec = yaml.safe_load((d / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            spec = {}
        hp = {**(spec.get("hyperparameters") or {}), **{k: spec[k] for k in ("lora", "quantization", "checkpointing") if k in spec}}
        created = metrics.stat().st_mtime if metrics.is_file() else d.stat().st_mtime
        return {"id": name, "status": status, "model": str(spec.get("model", "?")), "created_at": created,
                "trained_tokens": (done or {}).get("trained_tokens"),
                "fine_tuned_model": None, "error": None, "run_dir": str(d), "hyperparameters": hp, "_records": records}

    def list(self) -> list[dict]:
        return [self._view(n, d) for n, d in self.dirs.items()]

    def get(self, job_id: str) -> dict | None:
        d = self.dirs.get(job_id)
        return self._view(job_id, d) if d is not None else None

    def checkpoints(self, job: dict) -> list[dict]:
        from tunejob.train import checkpoint as ckpt

        evals = {r["step"]: r.get("valid_loss") for r in job["_records"] if r.get("kind") == "eval"}
        trains = {r["step"]: r.get("train_loss") for r in job["_records"] if r.get("kind") == "train"}
        return [{"step": step, "model": f'{job["id"]}/{path.name}', "train_loss": trains.get(step), "valid_loss": evals.get(step)}
                for step, path in reversed(ckpt.list_checkpoints(Path(job["run_dir"])))]

    def events(self, job: dict) -> list[tuple[float, str, str]]:
        return [(job["created_at"], "info", f'step {r["step"]}: {r["message"]}') for r in reversed(job["_records"])
                if r.get("kind") not in ("train", "eval") and r.get("message")][:50]

    async def chat(self, model: str, message: str) -> str:
        """Base model + the checkpoint's adapter in this process (cached), greedy, 64 tokens."""
        import asyncio

        from tunejob.evaluate.chat import ModelCache, base_model_of
        from tunejob.server.inference import completion

        name, _, step_dir = model.partition("/")
        run = self.dirs.get(name)
        ckpt_dir = run / "checkpoints" / step_dir if run is not None and re.fullmatch(r"step-\d{6,}", step_dir) else None
        if ckpt_dir is None or not (ckpt_dir / "adapter_config.json").is_file():
            raise ValueError(f"no checkpoint {model!r} among these runs")
        self._cache = self._cache or ModelCache()

        def run_chat() -> str:
            m, tok = self._cache.get(base_model_of(ckpt_dir), ckpt_dir)
            out = completion.complete(m, tok, [{"role": "user", "content": message}], model, max_tokens=64, temperature=0)
            return out["choices"][0]["message"]["content"] or ""

        return await asyncio.get_running_loop().run_in_executor(None, run_chat)


async def chat_in_process(app: FastAPI, owner: str, model: str, message: str) -> dict:
    """The same code path as POST /v1/chat/completions, called in-process with the session's owner."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": message}], "max_tokens": 64}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"content-type", b"application/json")],
             "query_string": b"", "state": {"owner": owner}, "app": app}
    request = Request(scope, receive)
    request.state.owner = owner
    try:
        out = await app.state.chat_completions(request)
        return json.loads(out.body) if isinstance(out, Response) else out  # a 429 comes back as a response
    except Exception as exc:  # ApiError and friends: show the message on the page
        return {"error": {"message": getattr(exc, "message", None) or f"{exc.__class__.__name__}: {exc}"}}

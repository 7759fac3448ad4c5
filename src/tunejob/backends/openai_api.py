"""The OpenAI backend: OpenAI's fine-tuning API, Azure OpenAI, or any compatible service
(tunejob serve included), through the official SDK.

    validate locally -> record the job (with an idempotency tag) -> upload train/validation
    -> create the job exactly once -> store its id -> poll status and events into the stream

Retries: the SDK retries 408/409/429/5xx and connection errors itself, with backoff, honouring
Retry-After (set by openai.max_retries). The create call is the exception: a retried POST whose
first attempt reached the server would make a second job, so create runs without SDK retries and
tunejob retries it by hand, each time first looking for a job already carrying its tag.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tunejob import catalog
from tunejob.backends.remote_run import TERMINAL, RemoteRun, metrics_records, say
from tunejob.data.dataset import load_examples, split_examples, write_jsonl
from tunejob.errors import BackendError
from tunejob.backends.jobstore import JobRecord, JobStore
from tunejob.spec import JobSpec, OpenAISettings, parse_spec

TAG_KEY = "tunejob_tag"


def make_client(settings: OpenAISettings, max_retries: int | None = None):
    import openai

    key = os.environ.get(settings.api_key_env)
    if not key:
        raise BackendError(f"set {settings.api_key_env} to your API key (tunejob reads keys from the environment, never from the spec)")
    retries = settings.max_retries if max_retries is None else max_retries
    if settings.azure_endpoint:
        return openai.AzureOpenAI(azure_endpoint=settings.azure_endpoint, api_version=settings.api_version or "2025-04-01-preview",
                                  api_key=key, max_retries=retries, timeout=settings.timeout)
    return openai.OpenAI(base_url=settings.base_url, api_key=key, organization=settings.organization, project=settings.project,
                         max_retries=retries, timeout=settings.timeout)


def explain(exc: Exception, settings: OpenAISettings) -> BackendError:
    """An SDK error as one clear line, with what to do."""
    import openai

    if isinstance(exc, openai.PermissionDeniedError) and (exc.code == "training_not_available" or "training_not_available" in str(exc)):
        return BackendError("OpenAI refused the job (403 training_not_available): OpenAI is winding down self-serve fine-tuning "
                            "(no new jobs after 2027-01-06). Train an open model instead: backend: local, or run `tunejob serve` "
                            "and point openai.base_url at it; the same code keeps working.")
    if isinstance(exc, openai.RateLimitError):
        return BackendError(f"rate limited (429) by {settings.base_url or 'the OpenAI API'} after {settings.max_retries} retries: "
                            f"{_message(exc)}; wait and run again (the job is created only once), or raise openai.max_retries")
    if isinstance(exc, openai.BadRequestError) and (_body(exc).get("param") in ("training_file", "validation_file") or "file" in str(_body(exc).get("code"))):
        param = _body(exc).get("param") or "file"
        return BackendError(f"the service rejected the {param}: {_message(exc)}; check it with `tunejob validate FILE --model MODEL`")
    if isinstance(exc, openai.AuthenticationError):
        return BackendError(f"the service rejected the API key in {settings.api_key_env} (401); check it and openai.base_url")
    if isinstance(exc, openai.APIStatusError):
        return BackendError(f"{exc.status_code} from the fine-tuning API: {_message(exc)} (param {_body(exc).get('param')})")
    if isinstance(exc, openai.APIConnectionError):
        return BackendError(f"cannot reach {settings.base_url or 'the OpenAI API'} after {settings.max_retries} retries ({exc.__class__.__name__}); "
                            "check the network and openai.base_url; `tunejob watch` re-attaches later")
    return BackendError(f"{exc.__class__.__name__}: {exc}")


def request_body(spec: JobSpec, tag: str, train_file: str, val_file: str | None) -> dict:
    """The fine_tuning.jobs.create body (OpenAI's CreateFineTuningJobRequest; tests validate it
    against the published OpenAPI schema). A hyperparameter left unset or 'auto' is sent as
    'auto', so OpenAI's own choice applies, not tunejob's local default."""
    hp, settings = spec.hyperparameters, spec.openai
    chosen = {name: getattr(hp, key) if key in hp.model_fields_set else "auto"
              for name, key in (("n_epochs", "epochs"), ("batch_size", "batch_size"), ("learning_rate_multiplier", "learning_rate_multiplier"))}
    kind = spec.method.type
    if kind == "dpo":  # beta unset: OpenAI's own choice, as for the others
        chosen["beta"] = spec.method.beta if spec.method.beta is not None else "auto"
    section = {"hyperparameters": chosen}
    if kind == "reinforcement":  # OpenAI's own hyperparameters and the grader, as the spec holds them
        rl = spec.method.rl.model_dump()
        chosen.update({k: v for k, v in rl.items() if k not in chosen or v != "auto"})
        section["grader"] = spec.method.grader
    body = {"model": spec.model, "training_file": train_file, "seed": hp.seed,
            "metadata": {**(settings.metadata or {}), TAG_KEY: tag},
            "method": {"type": kind, kind: section}}
    if val_file:
        body["validation_file"] = val_file
    if settings.suffix:
        body["suffix"] = settings.suffix
    if settings.wandb:
        body["integrations"] = [{"type": "wandb", "wandb": settings.wandb.model_dump(exclude_none=True)}]
    return body


def _body(exc) -> dict:
    body = getattr(exc, "body", None)
    return body if isinstance(body, dict) else {}


def _message(exc) -> str:
    return " ".join(str(_body(exc).get("message") or getattr(exc, "message", exc)).split())


class OpenAIBackend:
    def submit(self, spec: JobSpec, store: JobStore) -> JobRecord:
        import openai

        from tunejob.data.validate import require_valid

        for path in filter(None, [spec.data.train, spec.data.validation]):  # reinforcement: its grader too, before anything is uploaded
            require_valid(path, model=spec.model, method=spec.method.type, grader=spec.method.grader)
        settings = spec.openai
        client = make_client(settings)
        record = store.create("openai", spec.name, spec.to_yaml(), spec.run_dir)
        say(f"job {record.id} recorded in {store.path} (re-attach any time: tunejob watch {record.id})")
        try:
            train_file, val_file = self._upload(client, spec, record, store)
            job = self._create_once(client, record.tag, request_body(spec, record.tag, train_file, val_file), settings)
        except (openai.OpenAIError, OSError) as exc:
            store.update(record.id, status="failed", detail={"error": str(explain(exc, settings))})
            raise explain(exc, settings) from None
        say(f"created {job.id} on {settings.base_url or 'api.openai.com'} ({job.status})")
        return store.update(record.id, remote_id=job.id, status=job.status)

    def _upload(self, client, spec: JobSpec, record: JobRecord, store: JobStore) -> tuple[str, str | None]:
        """Upload train and validation; without a validation file, split like the local backend does."""
        done = record.detail.get("files", {})
        if spec.data.validation is None:
            train, val = split_examples(load_examples(spec.data.train), spec.data.val_fraction, spec.data.seed)
            run_dir = Path(record.run_dir)
            paths = {"train": run_dir / "data" / "train.jsonl", "validation": run_dir / "data" / "validation.jsonl"}
            write_jsonl(paths["train"], train)
            write_jsonl(paths["validation"], val)
        else:
            paths = {"train": spec.data.train, "validation": spec.data.validation}
        for role, path in paths.items():
            if role not in done:
                with open(path, "rb") as f:
                    done[role] = client.files.create(file=(f"{spec.name}-{role}.jsonl", f), purpose="fine-tune").id
                store.update(record.id, detail={"files": done})  # an upload is never repeated on re-submit
        return done["train"], done.get("validation")

    def _create_once(self, client, tag: str, kwargs: dict, settings: OpenAISettings):
        import openai

        no_retry = client.with_options(max_retries=0)
        attempts = settings.max_retries + 1
        for attempt in range(attempts):
            existing = self._find_tagged(client, tag)
            if existing is not None:
                return existing
            try:
                return no_retry.fine_tuning.jobs.create(**kwargs)
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
                if attempt == attempts - 1:
                    raise
                delay = min(retry_after(exc) or min(0.5 * 2**attempt, 8.0), 60.0)
                say(f"create failed ({exc.__class__.__name__}); checking for the job and retrying in {delay:.1f}s")
                time.sleep(delay)
            except openai.APIStatusError as exc:
                if exc.status_code in (408, 409) and attempt < attempts - 1:
                    time.sleep(min(0.5 * 2**attempt, 8.0))
                    continue
                raise
        raise BackendError("could not create the job")  # unreachable: the loop returns or raises

    @staticmethod
    def _find_tagged(client, tag: str):
        for job in client.fine_tuning.jobs.list(limit=50):
            if (job.metadata or {}).get(TAG_KEY) == tag:
                return job
        return None

    def watch(self, record: JobRecord, store: JobStore) -> dict:
        import openai

        spec = parse_spec(record.spec)
        settings = spec.openai
        if not record.remote_id:
            raise BackendError(f"{record.id} has no remote job yet (status {record.status}); submit it again with tunejob run")
        client = make_client(settings)
        run = RemoteRun(Path(record.run_dir), record.spec)
        job = None
        try:
            while True:
                job = client.fine_tuning.jobs.retrieve(record.remote_id)
                last = self._drain_events(client, record, store, run)
                store.update(record.id, status=job.status, last_event=last or record.last_event)
                record = store.get(record.id)
                if job.status in TERMINAL:
                    self._drain_events(client, record, store, run)
                    break
                time.sleep(settings.poll_interval)
        except openai.OpenAIError as exc:
            run.stream.close()
            raise explain(exc, settings) from None
        ckpts = _checkpoints(client, job.id) if job.status == "succeeded" else []
        if ckpts:  # the run directory's checkpoint list: `tunejob chat ft:...:ckpt-step-N` picks one
            (Path(record.run_dir) / "checkpoints.json").write_text(json.dumps(ckpts, indent=1) + "\n")
        info = catalog.lookup(spec.model)
        summary = run.finish({
            "status": job.status, "stop_reason": job.status, "remote_id": job.id, "fine_tuned_model": job.fine_tuned_model,
            "trained_tokens": job.trained_tokens, "checkpoints": ckpts, "result_files": job.result_files,
            "error": job.error.message if job.error and job.error.message else None, "provider": "openai",
            "training_cost_usd": round(job.trained_tokens * info.training_per_1m / 1e6, 6) if job.trained_tokens and info and info.training_per_1m else None,
        })
        store.update(record.id, status=job.status, detail={"fine_tuned_model": job.fine_tuned_model, "checkpoints": [c["model"] for c in ckpts]})
        if job.status == "failed":
            code = f" ({job.error.code}, param {job.error.param})" if job.error and job.error.code else ""
            raise BackendError(f"job {job.id} failed: {summary['error'] or 'no reason given'}{code}")
        return summary

    def _drain_events(self, client, record: JobRecord, store: JobStore, run: RemoteRun) -> str | None:
        """New events since the last one seen (the API lists newest first), oldest first into the stream."""
        fresh = []
        for event in client.fine_tuning.jobs.list_events(record.remote_id, limit=100):
            if event.id == record.last_event:
                break
            fresh.append(event)
        for event in reversed(fresh):
            if event.type == "metrics" and event.data:
                for r in metrics_records(dict(event.data)):
                    run.emit(r)
            else:
                run.emit({"kind": "event", "step": 0, "message": event.message})
        if fresh:
            store.update(record.id, last_event=fresh[0].id)
        return fresh[0].id if fresh else None

    def cancel(self, record: JobRecord) -> str:
        spec = parse_spec(record.spec)
        job = make_client(spec.openai).fine_tuning.jobs.cancel(record.remote_id)
        return job.status


def _checkpoints(client, job_id: str) -> list[dict]:
    """The job's checkpoints, oldest first: step, the model name to chat with, and the metrics."""
    out = [{"step": c.step_number, "model": c.fine_tuned_model_checkpoint, "metrics": c.metrics.model_dump(exclude_none=True) if c.metrics else {}}
           for c in client.fine_tuning.jobs.checkpoints.list(job_id)]
    return sorted(out, key=lambda c: c["step"])


def retry_after(exc) -> float | None:
    """Seconds the server asked to wait, as the SDK reads them: retry-after-ms, else Retry-After
    (seconds, or an HTTP date); None when it named none."""
    import email.utils

    response = getattr(exc, "response", None)
    headers = response.headers if response is not None else {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None

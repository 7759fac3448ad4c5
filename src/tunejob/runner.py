"""Run a job spec on its backend. Only the local backend exists so far; the API backends (OpenAI,
Bedrock) plug in here once they are built (see docs/architecture.md)."""

from __future__ import annotations

from tunejob.errors import BackendError
from tunejob.spec import JobSpec


def run_job(spec: JobSpec, resume: bool | None = None) -> dict:
    if spec.backend == "local":
        from tunejob.trainer import train

        return train(spec, resume=resume)
    raise BackendError(
        f"backend '{spec.backend}' cannot run jobs yet in this version; `tunejob plan` and `tunejob validate` "
        "work for it, and backend 'local' trains open models"
    )

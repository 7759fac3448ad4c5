"""Run a job spec on its backend: the local trainer in-process, or an API backend (submit, then
watch). Every API job is in the job store before it is polled."""

from __future__ import annotations

from tunejob.jobstore import JobStore
from tunejob.spec import JobSpec


def run_job(spec: JobSpec, resume: bool | None = None) -> dict:
    if spec.backend == "local":
        from tunejob.trainer import train

        return train(spec, resume=resume)
    from tunejob.backends import get_backend

    backend, store = get_backend(spec.backend), JobStore()
    record = backend.submit(spec, store)
    return backend.watch(record, store)


def watch_job(job_id: str) -> dict:
    from tunejob.backends import get_backend

    store = JobStore()
    record = store.get(job_id)
    return get_backend(record.backend).watch(record, store)


def cancel_job(job_id: str) -> str:
    from tunejob.backends import get_backend

    store = JobStore()
    record = store.get(job_id)
    status = get_backend(record.backend).cancel(record)
    store.update(record.id, status=status)
    return status

"""Backends: fine-tuning jobs that run at a provider, watched from here. Imports evaluate and
the stages below it; `remote_run.py` turns provider events into a local run directory.

Each backend is one small class with the same three methods, registered in BACKENDS the way a
third-party one would be:

    submit(spec, store) -> JobRecord    validate locally, upload, create the job (exactly once)
    watch(record, store) -> dict        follow it to the end, feeding the common metric stream
    cancel(record) -> str               ask the provider to stop it; returns the new status

The local backend is the trainer itself (tunejob.train.trainer.train), which runs in-process.
Whatever the backend, a watched job leaves the same run directory as a local run (config.yaml,
metrics.jsonl, summary.json), so `tunejob diagnose` and `tunejob report` work on it.
"""

from __future__ import annotations

from typing import Protocol

from tunejob.backends.jobstore import JobRecord, JobStore
from tunejob.spec import JobSpec


class Backend(Protocol):
    def submit(self, spec: JobSpec, store: JobStore) -> JobRecord: ...

    def watch(self, record: JobRecord, store: JobStore) -> dict: ...

    def cancel(self, record: JobRecord) -> str: ...


def get_backend(name: str) -> Backend:
    if name == "openai":
        from tunejob.backends.openai_api import OpenAIBackend

        return OpenAIBackend()
    if name == "bedrock":
        from tunejob.backends.bedrock import BedrockBackend

        return BedrockBackend()
    raise KeyError(name)

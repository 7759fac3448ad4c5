"""Run a job spec on its backend: the local trainer in-process, or an API backend (submit, then
watch). Every API job is in the job store before it is polled."""

from __future__ import annotations

from tunejob.backends.jobstore import JobStore
from tunejob.spec import JobSpec


def run_job(spec: JobSpec, resume: bool | None = None) -> dict:
    if spec.backend == "local":
        from tunejob.train.trainer import train

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


def chat_api(target: str, messages: list[dict], max_tokens: int) -> str | None:
    """Answer through the provider when `target` is an API job id or its fine-tuned model name;
    None when the job store knows no such job (the caller then treats it as a local run)."""
    from tunejob.backends.openai_api import explain, make_client
    from tunejob.errors import BackendError
    from tunejob.spec import parse_spec

    store = JobStore()
    record = next((r for r in store.list() if target in (r.id, r.remote_id, r.detail.get("fine_tuned_model"), *r.detail.get("checkpoints", []))), None)
    if record is None:
        return None
    if record.backend != "openai":
        raise BackendError(f"{record.id}: chat with a {record.backend} custom model through its provider's console or runtime API")
    model = target if target.startswith("ft:") else record.detail.get("fine_tuned_model")
    if not model:
        raise BackendError(f"{record.id} has no fine-tuned model yet (status {record.status})")
    spec = parse_spec(record.spec)
    import openai

    try:
        reply = make_client(spec.openai).chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
    except openai.OpenAIError as exc:
        raise explain(exc, spec.openai) from None
    return reply.choices[0].message.content or ""


def chat_reply(target: str, message: str, system: str | None, max_new_tokens: int, say=print) -> str:
    """`tunejob chat`: the answer of a local run / checkpoint (greedy, as `tunejob eval`), or of an
    API job / fine-tuned model through its provider. `system` None takes the run's own prompt."""
    from pathlib import Path

    if system is None and Path(target).exists():
        from tunejob.evaluate.chat import trained_system_prompt

        system = trained_system_prompt(target)
        if system:
            say(f"system prompt: the run's own ({system[:60]}{'...' if len(system) > 60 else ''}); --system '' sends none")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    if not Path(target).exists():
        reply = chat_api(target, messages, max_new_tokens)
        if reply is not None:
            return reply
    from tunejob.evaluate.chat import answer, load_for_chat

    model, tokenizer = load_for_chat(target)
    return answer(model, tokenizer, messages, max_new_tokens)

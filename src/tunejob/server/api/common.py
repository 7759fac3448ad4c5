"""What every route of `tunejob serve` shares: the server's settings and state, OpenAI's list page,
the owner of a request (set by the API-key check in app.py), and reading a body under a byte cap."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from tunejob import catalog
from tunejob.server.config import DEFAULT_BODY_BYTES, PARSE_INLINE_BYTES, ServerConfig
from tunejob.server.errors import ApiError
from tunejob.server.jobs.store import Store
from tunejob.server.jobs.worker import Worker


def page(items: list[dict], after: str | None, limit: int | None) -> dict:
    """OpenAI's list object: a page of up to `limit` items after the id `after`."""
    limit = max(1, min(int(limit or 20), 100))
    start = 0
    if after:
        ids = [i["id"] for i in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    chunk = items[start : start + limit]
    return {"object": "list", "data": chunk, "has_more": start + limit < len(items),
            "first_id": chunk[0]["id"] if chunk else None, "last_id": chunk[-1]["id"] if chunk else None}


def public(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_") and k != "control"}


def owner(request: Request) -> str:
    return request.state.owner


def check_length(request: Request, limit: int, error: ApiError) -> None:
    """A Content-Length over `limit` is refused before a byte of the body is read."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise error


async def capped(stream: AsyncIterator[bytes], limit: int, error: ApiError) -> AsyncIterator[bytes]:
    """The body, stopped with `error` as soon as it passes `limit` bytes. Counting while reading is
    what holds for a chunked body (no Content-Length): Starlette's request.body() would read it all."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise error
        yield chunk


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body too large: over {limit:,} bytes; this server accepts JSON bodies of up to {limit:,} "
                         "bytes (its --max-body-mb)", code="request_too_large")


async def json_body(request: Request) -> object:
    """The request body's JSON value, read under the server's --max-body-mb (a 413 past it) and
    parsed only once complete; a 400 in OpenAI's error shape if it is not JSON."""
    limit = getattr(request.app.state, "max_body_bytes", DEFAULT_BODY_BYTES)
    error = body_too_large(limit)
    check_length(request, limit, error)
    body = b"".join([chunk async for chunk in capped(request.stream(), limit, error)])
    try:
        return json.loads(body) if len(body) <= PARSE_INLINE_BYTES else await run_in_threadpool(json.loads, body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON") from None


async def json_object(request: Request) -> dict:
    """The request body as a JSON object, or a 400 in OpenAI's error shape."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return body


@dataclass
class ServerState:
    """The store, the job worker and the base models, shared by the resource routers."""

    config: ServerConfig
    store: Store
    worker: Worker
    base_models: dict[str, str]

    def base_for(self, model: str) -> str | None:
        """The base model a plain name or OpenAI model id trains and chats with. Never an `ft:`
        name: catalog.lookup strips `ft:` for pricing, which would make a fine-tuned name the base."""
        if model in self.base_models:
            return model
        if model.startswith("ft:"):
            return None
        info = catalog.lookup(model)
        if info is not None and info.provider == "openai":
            return "default"
        return None

    def file_or_404(self, who: str, file_id: str) -> dict:
        f = self.store.get_file(who, file_id)
        if f is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return f

    def job_or_404(self, who: str, job_id: str) -> dict:
        job = self.store.get_job(who, job_id)
        if job is None:
            raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="fine_tuning_job_not_found")
        return job

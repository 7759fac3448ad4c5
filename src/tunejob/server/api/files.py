"""/v1/files: upload (size-checked while it streams, validated on arrival), list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from tunejob.server.errors import ApiError

from tunejob.server.api.common import ServerState, capped, check_length, owner, page
from tunejob.server.api.requests import ListFilesQuery, UploadForm, parse
from tunejob.server.jobs.store import new_id, safe_filename

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and the purpose field around the file


def validation_status(path) -> tuple[str, str | None]:
    """('processed', None), or ('error', the first problems with their line numbers)."""
    from tunejob.data.validate import validate_file

    report = validate_file(path, min_examples=1)
    if report.ok or (report.data_kind == "chat" and validate_file(path, format="reinforcement", min_examples=1).ok):
        return "processed", None  # chat examples, preference pairs, or reinforcement's prompts (jobs.py matches them to the method)
    first = [f"line {p.line}: {p.kind}: {p.message}" if p.line else f"{p.kind}: {p.message}"
             for ps in report.problems.values() for p in ps if p.severity == "error"][:5]
    return "error", f"{report.errors} error(s): " + "; ".join(first)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"File too large: over {limit:,} bytes; this server accepts up to {limit:,} (its --max-upload-mb)",
                    param="file", code="file_too_large")


async def read_form(request: Request, limit: int) -> FormData:
    """The form, its body stopped with a 413 once it passes `limit` + the form's overhead: counted
    before the form parser, since Starlette's request.form() spools a whole chunked body to a temp
    file first."""
    check_length(request, limit + FORM_OVERHEAD, too_large(limit))
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = capped(request.stream(), limit + FORM_OVERHEAD, too_large(limit))
    if kind == "multipart/form-data":
        parser = MultiPartParser(request.headers, body, max_files=1, max_fields=10)
    elif kind == "application/x-www-form-urlencoded":
        parser = FormParser(request.headers, body)
    else:
        raise ApiError(400, "Send the upload as multipart/form-data with fields 'file' and 'purpose'", param="file")
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"Malformed multipart body: {exc.message}", param="file") from None


def router(state: ServerState) -> APIRouter:
    api, store, limit = APIRouter(), state.store, state.config.max_upload_bytes

    @api.post("/v1/files")
    async def upload(request: Request):
        form = await read_form(request, limit)
        try:
            fields = {k: v for k, v in form.multi_items() if k != "file" and isinstance(v, str)}
            parse(UploadForm, fields)
            upload_file = form.get("file")
            if upload_file is None or isinstance(upload_file, str):
                raise ApiError(400, "Missing required parameter: 'file' (send it as multipart field 'file')", param="file")
            return await _store_upload(state, owner(request), upload_file, fields["purpose"], limit)
        finally:
            await form.close()

    @api.get("/v1/files")
    def list_files(request: Request, q: Annotated[ListFilesQuery, Query()]):
        files = store.list_files(owner(request), q.purpose)
        return page(files if q.order == "desc" else files[::-1], q.after, q.limit)

    @api.get("/v1/files/{file_id}")
    def get_file(request: Request, file_id: str):
        return state.file_or_404(owner(request), file_id)

    @api.get("/v1/files/{file_id}/content")
    def file_content(request: Request, file_id: str):
        state.file_or_404(owner(request), file_id)
        return Response(store.file_path(file_id).read_bytes(), media_type="application/octet-stream")

    @api.delete("/v1/files/{file_id}")
    def delete_file(request: Request, file_id: str):
        state.file_or_404(owner(request), file_id)
        store.delete_file(owner(request), file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    return api


async def _store_upload(state: ServerState, who: str, upload_file, purpose: str, limit: int) -> dict:
    """The upload written under its new id (a `.part` first, renamed when complete), then validated."""
    store = state.store
    file_id = new_id("file")
    path = store.file_path(file_id)
    size, tmp = 0, path.with_name(f".{file_id}.part")
    try:
        with tmp.open("wb") as out:
            while chunk := await upload_file.read(1024 * 1024):
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                out.write(chunk)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    # validating reads every line: off the event loop, so other requests keep being answered
    status, details = await run_in_threadpool(validation_status, path) if purpose == "fine-tune" else ("processed", None)
    return store.add_file(who, safe_filename(upload_file.filename), purpose, size, status, details, file_id)

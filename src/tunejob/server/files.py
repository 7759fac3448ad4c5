"""/v1/files: upload (size-checked while it streams, validated on arrival), list, retrieve, content, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from tunejob.server.api import ApiError, ServerState, owner, page
from tunejob.server.store import new_id, safe_filename

PURPOSES = ("fine-tune", "fine-tune-results", "assistants", "batch", "user_data")


def validation_status(path) -> tuple[str, str | None]:
    """('processed', None), or ('error', the first problems with their line numbers)."""
    from tunejob.data.validate import validate_file

    report = validate_file(path, min_examples=1)
    if report.ok:
        return "processed", None
    first = [f"line {p.line}: {p.kind}: {p.message}" if p.line else f"{p.kind}: {p.message}"
             for ps in report.problems.values() for p in ps if p.severity == "error"][:5]
    return "error", f"{report.errors} error(s): " + "; ".join(first)


def router(state: ServerState) -> APIRouter:
    api, store, limit = APIRouter(), state.store, state.config.max_upload_bytes

    @api.post("/v1/files")
    async def upload(request: Request):
        length = int(request.headers.get("content-length") or 0)
        if length > limit + 64 * 1024:
            raise ApiError(413, f"File too large: {length:,} bytes; this server accepts up to {limit:,}", code="file_too_large")
        form = await request.form()
        purpose, upload_file = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES:
            raise ApiError(400, f"Invalid purpose {purpose!r}; use 'fine-tune'", param="purpose")
        if upload_file is None or isinstance(upload_file, str):
            raise ApiError(400, "Missing file: send it as multipart field 'file'", param="file")
        file_id = new_id("file")
        path = store.file_path(file_id)
        size, tmp = 0, path.with_name(f".{file_id}.part")
        with tmp.open("wb") as out:
            while chunk := await upload_file.read(1024 * 1024):
                size += len(chunk)
                if size > limit:
                    out.close()
                    tmp.unlink(missing_ok=True)
                    raise ApiError(413, f"File too large: over {limit:,} bytes", code="file_too_large")
                out.write(chunk)
        tmp.replace(path)
        status, details = await run_in_threadpool(validation_status, path) if purpose == "fine-tune" else ("processed", None)
        return store.add_file(owner(request), safe_filename(upload_file.filename), purpose, size, status, details, file_id)

    @api.get("/v1/files")
    def list_files(request: Request, purpose: str | None = None, after: str | None = None, limit: int | None = None):
        return page(store.list_files(owner(request), purpose), after, limit or 100)

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

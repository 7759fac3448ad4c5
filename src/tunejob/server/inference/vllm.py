"""The vLLM engine (`tunejob serve --engine vllm --vllm-url URL`): chat runs on a vLLM server
started with `--enable-lora` (and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, which enables its
runtime LoRA endpoints), on the same machine or one that sees the same data directory.

- When a job succeeds, its best adapter is handed to vLLM (`POST /v1/load_lora_adapter` with
  {"lora_name", "lora_path"}) before the job is marked succeeded; a checkpoint (or an adapter vLLM
  lost on a restart) is handed over at its first chat.
- Chat is forwarded to vLLM's /v1/chat/completions after tunejob has resolved the model for the
  caller's key (models.resolve_chat_model), so per-key isolation is tunejob's, as with the local
  engine. vLLM sees an opaque adapter name (a digest of the adapter's path), never the
  fine-tuned model id; answers carry the id the client asked for.
- vLLM serves one base model: the `default` base should be the model vLLM was started with.
- The body is checked by tunejob first (chat.parse_request, the local engine's own check), then
  forwarded whole: a request one engine refuses, the other refuses too, and vLLM does `stop`, `n`,
  `logprobs`, the penalties and `response_format` (with xgrammar, as engine/grammar.py) itself.

Why forward rather than send clients to vLLM: vLLM has no notion of tunejob's keys and owners.
Keep vLLM's port private (127.0.0.1 or an internal network): anyone reaching it can chat with
every adapter it holds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx2 as httpx  # the HTTP client openai and huggingface_hub use (httpx's API)
from fastapi.responses import JSONResponse, StreamingResponse

from tunejob.server.errors import ApiError
TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a long answer on a busy GPU; connecting is quick or broken


def lora_name(adapter: Path) -> str:
    return "tunejob-" + hashlib.sha256(str(Path(adapter).resolve()).encode()).hexdigest()[:20]


class VllmEngine:
    def __init__(self, url: str, log=print):
        self.url, self.log = url.rstrip("/"), log
        self._loaded: set[str] = set()
        self._base: str | None = None

    def _unreachable(self, exc: Exception) -> ApiError:
        return ApiError(502, f"the vLLM server at {self.url} did not answer ({exc.__class__.__name__}); "
                        "check that it runs and that --vllm-url points at it", type="server_error", code="engine_unavailable")

    def _loaded_reply(self, name: str, adapter: Path, response: httpx.Response) -> None:
        # vLLM answers 400 "... has already been loaded" for a name it holds (tunejob restarted, vLLM did not)
        if response.status_code == 200 or (response.status_code == 400 and "already" in response.text):
            self._loaded.add(name)
            self.log(f"chat: adapter {adapter} loaded into vLLM as {name}")
            return
        raise ApiError(502, f"the vLLM server refused adapter {adapter.name}: HTTP {response.status_code} {response.text[:300]}",
                       type="server_error", code="engine_error")

    def load_now(self, adapter: Path) -> None:
        """Hand an adapter to vLLM (blocking; the job worker's thread calls it on success)."""
        name = lora_name(adapter)
        try:
            response = httpx.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(Path(adapter).resolve())},
                                  timeout=TIMEOUT)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        self._loaded_reply(name, Path(adapter), response)

    async def _model(self, client: httpx.AsyncClient, adapter: Path | None) -> str:
        """vLLM's name for the model: the adapter's (loaded first if need be) or the base's."""
        if adapter is not None:
            name = lora_name(adapter)
            if name not in self._loaded:
                response = await client.post(f"{self.url}/v1/load_lora_adapter",
                                             json={"lora_name": name, "lora_path": str(Path(adapter).resolve())})
                self._loaded_reply(name, Path(adapter), response)
            return name
        if self._base is None:  # vLLM lists its base model (parent null) and the adapters it holds
            models = (await client.get(f"{self.url}/v1/models")).json()["data"]
            self._base = next(m["id"] for m in models if not m.get("parent"))
        return self._base

    async def chat(self, body: dict, name: str, adapter: Path | None, retry: bool = True):
        """Forward one chat completion; the answer (or each streamed chunk) carries `name`."""
        client = httpx.AsyncClient(timeout=TIMEOUT)
        try:
            forwarded = dict(body, model=await self._model(client, adapter))
            request = client.build_request("POST", f"{self.url}/v1/chat/completions", json=forwarded)
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            raise self._unreachable(exc) from None
        except BaseException:
            await client.aclose()
            raise
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            await client.aclose()
            if response.status_code == 404 and adapter is not None and retry:  # vLLM restarted and lost it: hand it over again
                self._loaded.discard(lora_name(adapter))
                return await self.chat(body, name, adapter, retry=False)
            raise _upstream_error(response.status_code, text)
        if not body.get("stream"):
            answer = json.loads(await response.aread())
            await client.aclose()
            return JSONResponse(dict(answer, model=name))
        return StreamingResponse(_renamed(response, client, name), media_type="text/event-stream")


async def _renamed(response: httpx.Response, client: httpx.AsyncClient, name: str):
    """vLLM's server-sent events with the client's model id in every chunk."""
    try:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "model" in chunk:
                    chunk["model"] = name
                line = "data: " + json.dumps(chunk)
            if line:
                yield line + "\n\n"
    finally:
        await response.aclose()
        await client.aclose()


def _upstream_error(status: int, text: str) -> ApiError:
    """vLLM's 4xx as the same status in OpenAI's shape (it names the field); its 5xx as 502."""
    try:
        err = json.loads(text)
        err = err.get("error", err)  # {"error": {...}} in OpenAI's shape, or the older flat {"object": "error", ...}
        message, param = str(err.get("message", text)), err.get("param")
    except (json.JSONDecodeError, AttributeError):
        message, param = text[:500], None
    if 400 <= status < 500:
        return ApiError(status, f"vLLM: {message}", param=param)
    return ApiError(502, f"the vLLM server failed: HTTP {status} {message[:300]}", type="server_error", code="engine_error")

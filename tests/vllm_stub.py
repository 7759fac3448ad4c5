"""A stand-in for a vLLM OpenAI-compatible server (vllm 0.x `vllm serve --enable-lora` with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), for tests where no GPU runs the real one. It enforces the
request shapes vLLM documents: `POST /v1/load_lora_adapter` takes {"lora_name", "lora_path"} (and
optionally "load_inplace"), answers 200 with a text line, and 400 for a name already loaded;
chat bodies must be OpenAI's CreateChatCompletionRequest (checked against OpenAI's published
spec) naming the base model or a loaded adapter (else 404); `GET /v1/models` lists the base
(parent null) and each adapter (parent: the base). Answers are canned: "stub answer from MODEL",
or what `answer(body)` returns (the graders' tests: a judge with fixed answers). `POST
/v1/embeddings` (vLLM serves it for embedding models) returns each text's letter counts."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from openai_schema import errors
from tunejob.server.run import free_port, wait_until_up

BASE = "stub/base-model"


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str
    load_inplace: bool = False


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


async def _checked(request: Request, component: str) -> tuple[dict, JSONResponse | None]:
    """The request's JSON body, and a 400 when OpenAI's schema `component` refuses it."""
    body = await request.json()
    problems = errors(component, body)
    return body, _error(400, "; ".join(problems), "BadRequestError") if problems else None


class VllmStub:
    def __init__(self, answer=None):
        self.answer = answer  # body -> the answer's text (default: "stub answer from MODEL")
        self.loads: list[dict] = []  # every accepted load_lora_adapter body
        self.chats: list[dict] = []  # every accepted chat body
        self.adapters: dict[str, str] = {}
        self.port = free_port()
        self.app = self._app()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VllmStub":
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_until_up(f"{self.url}/health", timeout=30)
        return self

    def stop(self) -> None:
        self._server.should_exit = True

    def wait_stopped(self, timeout: float = 10) -> None:
        self._thread.join(timeout)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        def health():
            return PlainTextResponse("")

        @app.get("/v1/models")
        def models():
            data = [{"id": BASE, "object": "model", "created": 0, "owned_by": "vllm", "root": BASE, "parent": None}]
            data += [{"id": n, "object": "model", "created": 0, "owned_by": "vllm", "root": p, "parent": BASE} for n, p in self.adapters.items()]
            return {"object": "list", "data": data}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request):
            body = LoadLoRAAdapterRequest.model_validate(await request.json())
            if body.lora_name in self.adapters:
                return _error(400, f"The lora adapter '{body.lora_name}' has already been loaded.", "BadRequestError")
            if not (Path(body.lora_path) / "adapter_config.json").is_file():
                return _error(404, f"No adapter found for {body.lora_path}", "NotFoundError")
            self.adapters[body.lora_name] = body.lora_path
            self.loads.append(body.model_dump())
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body, refused = await _checked(request, "CreateChatCompletionRequest")
            if refused:
                return refused
            if body["model"] != BASE and body["model"] not in self.adapters:
                return _error(404, f"The model `{body['model']}` does not exist.", "NotFoundError", "model")
            self.chats.append(body)
            text, cid = self.answer(body) if self.answer else f"stub answer from {body['model']}", "chatcmpl-stub"
            if not body.get("stream"):
                return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}

            def chunk(delta: dict, finish: str | None = None) -> str:
                return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                                              "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}) + "\n\n"

            pieces = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": w}) for w in re.findall(r"\S+\s*", text)]
            return StreamingResponse(iter(pieces + [chunk({}, "stop"), "data: [DONE]\n\n"]), media_type="text/event-stream")

        @app.post("/v1/embeddings")
        async def embeddings(request: Request):
            # vLLM serves embeddings for embedding models; here each text's letter counts a..z, so a
            # test can compute the expected cosine from the same vectors
            body, refused = await _checked(request, "CreateEmbeddingRequest")
            if refused:
                return refused
            texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
            data = [{"object": "embedding", "index": i, "embedding": letter_counts(t)} for i, t in enumerate(texts)]
            return {"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}}

        return app


def letter_counts(text: str) -> list[float]:
    return [float(text.lower().count(c)) for c in "abcdefghijklmnopqrstuvwxyz"]

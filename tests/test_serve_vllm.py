"""`tunejob serve --engine vllm`: a job's adapter is handed to vLLM when the job succeeds, and chat
is forwarded there with the client's model ids and tunejob's per-key isolation. vLLM needs a GPU,
so it is replaced by a stub that enforces vLLM's documented endpoints and request shapes
(tests/vllm_stub.py); bench/vllm_gpu_check.sh runs the same path against a real vLLM."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from conftest import write_chat_data
from test_serve import KEY_B, Server, client, wait_status
from vllm_stub import BASE, VllmStub


def test_chat_is_forwarded_to_vllm_with_the_adapter_loaded_on_success(tmp_path, tiny_model):
    stub = VllmStub().start()
    server = Server(tmp_path / "data", tiny_model, ("--engine", "vllm", "--vllm-url", stub.url)).start()
    try:
        a, b = client(server), client(server, KEY_B)
        f = a.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", 12), "rb"), purpose="fine-tune")
        job = a.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 1})
        ft = wait_status(a, job.id, ("succeeded",)).fine_tuned_model
        best = (server.data_dir / "jobs" / job.id / "run" / "best").resolve()
        assert [Path(x["lora_path"]) for x in stub.loads] == [best]  # handed over before the job read "succeeded"
        lora = stub.loads[0]["lora_name"]
        assert ft not in lora and job.id not in lora  # vLLM sees an opaque name

        answer = a.chat.completions.create(model=ft, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
        assert answer.model == ft and answer.choices[0].message.content == f"stub answer from {lora}"
        assert stub.chats[-1]["model"] == lora and stub.chats[-1]["max_tokens"] == 5
        pieces = list(a.chat.completions.create(model=ft, messages=[{"role": "user", "content": "hi"}], stream=True))
        assert {p.model for p in pieces} == {ft} and "".join(p.choices[0].delta.content or "" for p in pieces) == f"stub answer from {lora}"
        base = a.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert base.model == "default" and stub.chats[-1]["model"] == BASE

        sent = len(stub.chats)
        with pytest.raises(openai.NotFoundError):  # another key's model: refused by tunejob, never reaches vLLM
            b.chat.completions.create(model=ft, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.BadRequestError):  # a bad body: tunejob's 400, not forwarded
            a.chat.completions.create(model=ft, messages=[{"role": "user", "content": "hi"}], temperature=5)
        assert len(stub.chats) == sent

        stub.adapters.clear()  # vLLM restarted and lost the adapter: the next chat hands it over again
        again = a.chat.completions.create(model=ft, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert again.model == ft and len(stub.loads) == 2 and stub.loads[-1]["lora_name"] == lora

        stub.stop()  # vLLM gone: OpenAI's error shape with a 502 that names the engine, not a hang or a bare 500
        stub.wait_stopped()
        with pytest.raises(openai.APIStatusError) as err:
            a.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert err.value.status_code == 502 and err.value.code == "engine_unavailable" and "--vllm-url" in err.value.message
    finally:
        server.stop()
        stub.stop()

"""`tunejob serve` with no --engine (`auto`, inference/engine_choice.py), driven by the official
openai SDK over real HTTP on 127.0.0.1: on this CPU with llama-cpp-python installed, the base and a
LoRA run in llama.cpp, an rsLoRA adapter (which llama.cpp has no form of) runs in torch in the same
server, at the same time, and every answer is the local engine's own (engine.answers on the PEFT
model, in this process). Without llama-cpp-python, everything runs in torch and the log says why.

f32 GGUF and --chat-threads 1, as in test_serve_llama_cpp.py: f32 keeps llama.cpp's greedy tokens
those of torch on the tiny random model, and the 2 test cores are shared. --chat-dtype float32: the
reference answers are fp32, and `auto` picks bf16 for torch on a CPU with bf16 units.
"""

from __future__ import annotations

import threading

import pytest

from conftest import REPO
from test_export import adapted_checkpoint
from test_serve import Server, client
from test_serve_llama_cpp import ASK, _local_answers

FT, RS = "ft:tiny:acme::lora", "ft:tiny:acme::rslora"


def test_llama_cpp_runs_what_it_can_and_torch_the_rest_side_by_side(tmp_path, tiny_model):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the export extra: make setup / pip install -e .[export]")
    lora, _ = adapted_checkpoint(tiny_model, tmp_path / "lora" / "ckpt", scale=0.2)
    rslora, _ = adapted_checkpoint(tiny_model, tmp_path / "rslora" / "ckpt", scale=0.2, use_rslora=True)
    local = _local_answers(tiny_model, {"default": None, FT: lora, RS: rslora})
    server = Server(tmp_path / "data", tiny_model, ("--chat-gguf-type", "f32", "--chat-threads", "1", "--chat-dtype", "float32",
                                                    "--alias", f"{FT}={lora}", "--alias", f"{RS}={rslora}")).start()
    try:
        asks = [(name, prompt) for name in ("default", FT, RS) for prompt in ("alpha beta", "zeta")]
        got: dict = {}

        def ask(name: str, prompt: str) -> None:
            answer = client(server).chat.completions.create(model=name, **{**ASK, "messages": [{"role": "user", "content": prompt}]})
            got[name, prompt] = answer.choices[0].message.content

        workers = [threading.Thread(target=ask, args=pair) for pair in asks]  # all six at once
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=180)
        assert got == {pair: local[pair].content for pair in asks}, server.log.read_text()[-3000:]
        # fine-tuned means the adapter answers: both adapters' text differs from the base's
        assert local[FT, "alpha beta"].content != local["default", "alpha beta"].content != local[RS, "alpha beta"].content
        log = server.log.read_text()
        assert "--engine auto runs chat in llama.cpp" in log and f"{tiny_model} runs in llama.cpp from" in log
        assert log.count(f"chat: adapter {lora} converted") == 1  # the LoRA went to llama.cpp
        assert log.count(f"chat: {rslora} runs in torch, not llama.cpp (--engine auto): rsLoRA") == 1  # said once, not per request
        assert f"adapter {rslora} converted" not in log
    finally:
        server.stop()


def test_without_llama_cpp_python_auto_runs_chat_in_torch_and_says_why(tmp_path, tiny_model, monkeypatch):
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "llama_cpp.py").write_text("raise ImportError('no llama_cpp here')\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'shadow'}:{REPO / 'src'}")
    server = Server(tmp_path / "data", tiny_model, ("--chat-threads", "1")).start()
    try:
        answer = client(server).chat.completions.create(model="default", **ASK)
        assert answer.choices[0].message.content == _local_answers(tiny_model, {"default": None})["default", "alpha beta"].content
        log = server.log.read_text()
        assert "--engine auto runs chat in torch: llama-cpp-python is not installed (pip install -e .[export]" in log
        assert "runs in llama.cpp" not in log and not (tmp_path / "data" / "gguf").exists()
    finally:
        server.stop()

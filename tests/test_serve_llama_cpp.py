"""`tunejob serve --engine llama.cpp`, driven by the official openai SDK over real HTTP on
127.0.0.1: the base model and a fine-tuned adapter, converted to GGUF by the server and run by
llama-cpp-python, answer what the local engine answers.

The expected answers come from the local engine (engine.answers: the Batch and Decoding serve's
local engine feeds) on the PEFT model, in this process; the server never sees them. The server
converts to f32 (--chat-gguf-type f32): on the tiny random model (logits up to ~10, many near
ties) f16 rounding can change a greedy token, while f32 keeps llama.cpp's logits within ~1e-5 of
torch's (llama.py), so equal text is the right check. --chat-threads 1: the 2 test cores are
shared, and llama.cpp's threads wait on each other at every op (2 threads ran 10x slower than 1 on
a loaded machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from conftest import REPO
from test_export import adapted_checkpoint
from test_serve import Server, client

pytest.importorskip("llama_cpp", reason="llama-cpp-python is the export extra: make setup / pip install -e .[export]")

FT = "ft:tiny:acme::llama"  # the alias the adapter answers under
ASK = {"messages": [{"role": "user", "content": "alpha beta"}], "max_tokens": 12, "temperature": 0}
PROMPTS = ["alpha beta", "gamma delta epsilon", "zeta", "theta iota kappa lambda"]
REPEATED = "mu nu xi omicron pi"  # asked only by the prompt cache's test


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    """(server, adapter checkpoint, the local engine's answers): one llama.cpp server for the module,
    with the adapter as an alias and a model llama.cpp cannot run as `qwen3`."""
    from transformers import Qwen3Config

    root = tmp_path_factory.mktemp("llama-serve")
    ckpt, _ = adapted_checkpoint(tiny_model, root / "ckpt", scale=0.2)
    unsupported = root / "qwen3"
    Qwen3Config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2).save_pretrained(unsupported)
    server = Server(root / "data", tiny_model, ("--engine", "llama.cpp", "--chat-gguf-type", "f32", "--chat-threads", "1", "--chat-kv-tokens", "1024",
                                                 "--alias", f"{FT}={ckpt}", "--model", f"qwen3={unsupported}")).start()
    try:
        yield server, ckpt, _local_answers(tiny_model, {"default": None, FT: ckpt})
    finally:
        server.stop()


def _local_answers(base: Path, models: dict[str, Path | None]) -> dict:
    """{(model, prompt): the local engine's greedy answer} for each model name: the base (None) or a checkpoint."""
    from tunejob.engine.answers import answer_all
    from tunejob.engine.chat import ChatRequest
    from tunejob.evaluate.chat import load_for_chat

    out = {}
    for name, ckpt in models.items():
        model, tokenizer = load_for_chat(base=str(base)) if ckpt is None else load_for_chat(ckpt)
        prompts = [*PROMPTS, REPEATED]
        requests = [ChatRequest(messages=[{"role": "user", "content": p}], max_tokens=ASK["max_tokens"], temperature=0.0) for p in prompts]
        for prompt, choices in zip(prompts, answer_all(model, tokenizer, requests)):
            out[name, prompt] = choices[0]
    return out


def test_base_and_adapter_answer_as_the_local_engine_does(served):
    server, _, local = served
    c = client(server)
    for name in ("default", FT):
        answer = c.chat.completions.create(model=name, **ASK)
        want = local[name, "alpha beta"]
        assert answer.model == name and answer.choices[0].message.content == want.content, name
        assert answer.choices[0].finish_reason == want.finish_reason
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    # fine-tuned means the adapter answers: its text is not the base's
    assert local[FT, "alpha beta"].content != local["default", "alpha beta"].content


def test_a_stream_is_the_answer_in_pieces_and_ends_with_its_finish_reason(served):
    server, _, local = served
    chunks = list(client(server).chat.completions.create(model=FT, stream=True, stream_options={"include_usage": True}, **ASK))
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    # the local engine's contract: the streamed text is the content before to_result strips its ends
    assert "".join(ch.delta.content or "" for ch in choices).strip() == local[FT, "alpha beta"].content
    assert [ch.finish_reason for ch in choices][-1] == "length" and all(ch.finish_reason is None for ch in choices[:-1])
    assert chunks[-1].usage.completion_tokens == ASK["max_tokens"]


def test_stop_strings_and_max_tokens_end_the_answer(served):
    server, _, local = served
    c = client(server)
    full = local["default", "alpha beta"].content
    stop = full[len(full) // 2: len(full) // 2 + 3]  # three characters from the middle of the full answer
    cut = c.chat.completions.create(model="default", stop=[stop], **ASK)
    assert cut.choices[0].message.content == full[: full.index(stop)].strip() and cut.choices[0].finish_reason == "stop"
    short = c.chat.completions.create(model="default", **{**ASK, "max_tokens": 3})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert full.startswith(short.choices[0].message.content)


def test_a_model_llama_cpp_cannot_run_is_a_400_naming_the_model(served):
    server, _, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model="qwen3", stream=True, **ASK)
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == "model" and "--engine local" in body["message"]
    assert "qwen3" in body["message"]  # the reason: export supports llama, mistral, qwen2, gemma3_text


def test_the_kv_pool_is_capped_and_a_chat_longer_than_it_is_openais_400(served):
    """--chat-kv-tokens 1024 under the tiny model's 2,048-token context: the pool has 1,024 cells, and a
    chat that fits the model but not the pool is refused before it is queued, not cut off mid-answer."""
    server, _, _ = served
    c = client(server)
    c.chat.completions.create(model="default", **ASK)  # the base is loaded
    assert "(1024 KV cells" in server.log.read_text()
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="default", messages=ASK["messages"], max_tokens=1500)
    assert err.value.code == "context_length_exceeded" and "maximum context length is 1024 tokens" in err.value.message
    assert c.chat.completions.create(model="default", messages=ASK["messages"], max_tokens=4).choices[0].finish_reason == "length"


def test_concurrent_clients_share_steps_and_each_gets_its_own_answer(served):
    """Four clients at once, two on the base and two on the adapter: rows of both adapters in one
    llama.cpp batch, each answer the one it gets alone."""
    server, _, local = served
    asks = [("default" if i % 2 else FT, prompt) for i, prompt in enumerate(PROMPTS)]
    got: dict = {}

    def ask(name: str, prompt: str) -> None:
        answer = client(server).chat.completions.create(model=name, **{**ASK, "messages": [{"role": "user", "content": prompt}]})
        got[name, prompt] = answer.choices[0].message.content

    workers = [threading.Thread(target=ask, args=pair) for pair in asks]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert got == {pair: local[pair].content for pair in asks}


def test_rows_of_the_base_and_the_adapter_share_steps_and_answer_as_alone(served, tiny_model):
    """In process, on the server's cached files: a base row and an adapter row in one LlamaBatch
    (one decode per adapter each step, the adapter set and unset on the one context)."""
    from tunejob.engine.batch import Row
    from tunejob.engine.chat import ChatRequest, prompt_inputs
    from tunejob.server.inference.gguf_files import GgufFiles
    from tunejob.server.inference.llama import LlamaBatch, LlamaWeights

    server, ckpt, local = served
    weights = LlamaWeights(GgufFiles(server.data_dir / "gguf", "f32", log=lambda m: None), 4, log=lambda m: None)
    weights.use_threads(1)
    rows = []
    for name, adapter, prompt in (("default", None, "zeta"), (FT, ckpt, "gamma delta epsilon")):
        target = weights.target(str(tiny_model), adapter)
        request = ChatRequest(messages=[{"role": "user", "content": prompt}], max_tokens=ASK["max_tokens"], temperature=0.0)
        rows.append(Row(prompt_inputs(target.tokenizer, request, "cpu")["input_ids"][0].tolist(), request, target, weights.stop_ids(target),
                        owner=(name, prompt)))
    batch = LlamaBatch(weights, rows[0].target.key, 4)
    batch.join(rows)
    assert batch.rows == rows  # both decode in the same steps
    while batch.rows:
        batch.step()
        batch.finished()
    for row in rows:
        assert row.target.tokenizer.decode(row.tokens, skip_special_tokens=True).strip() == local[row.owner].content, row.owner


def test_the_gguf_is_converted_once_and_again_when_the_model_changes(served, tmp_path):
    from tunejob.server.inference.gguf_files import fingerprint

    server, ckpt, _ = served
    log = server.log.read_text()
    assert log.count("chat: converting") == 1 and log.count(f"chat: adapter {ckpt} converted") == 1
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"1234")
    before = fingerprint(folder, "f16")
    assert fingerprint(folder, "f16") == before and fingerprint(folder, "q8_0") != before
    (folder / "model.safetensors").write_bytes(b"12345")
    assert fingerprint(folder, "f16") != before


def test_without_llama_cpp_python_serve_says_what_to_install(tmp_path, tiny_model):
    """A llama_cpp that fails to import (as when the export extra is not installed): one line, exit 2."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "llama_cpp.py").write_text("raise ImportError('no llama_cpp here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), str(REPO / "src")]), TUNEJOB_API_KEYS="sk-tunejob-test-key-aaaa1111")
    done = subprocess.run([sys.executable, "-m", "tunejob", "serve", "--engine", "llama.cpp", "--data-dir", str(tmp_path / "d"),
                           "--default-model", str(tiny_model)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "pip install -e .[export]" in done.stderr and "make setup" in done.stderr
    assert json.dumps(done.stdout) == '""'


def test_a_repeated_prompt_is_read_from_the_cache_and_answers_the_same(served):
    """OpenAI's prompt caching: the second time a prompt comes, every prompt token but the last is the
    first answer's KV (usage.prompt_tokens_details.cached_tokens), and the answer is still the local
    engine's. The adapter's first ask of that prompt reuses none of the base's cells: a LoRA changes
    the keys and values, so reading the base's would give the base's answer."""
    server, _, local = served
    c = client(server)
    ask = {**ASK, "messages": [{"role": "user", "content": REPEATED}]}
    first, again = (c.chat.completions.create(model="default", **ask) for _ in range(2))
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < n - 1  # at most the template's shared start
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1
    assert first.choices[0].message.content == again.choices[0].message.content == local["default", REPEATED].content
    tuned = c.chat.completions.create(model=FT, **ask)
    assert tuned.usage.prompt_tokens_details.cached_tokens < n - 1
    assert tuned.choices[0].message.content == local[FT, REPEATED].content != local["default", REPEATED].content
    streamed = list(c.chat.completions.create(model=FT, stream=True, stream_options={"include_usage": True}, **ask))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == n - 1
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices).strip() == local[FT, REPEATED].content


def test_cached_prompts_give_their_cells_up_to_a_chat_that_needs_the_whole_pool(served, tiny_model):
    """In process, on a 512-cell pool: two finished chats stay cached; then a chat that reuses the
    first one's prompt and fills all 512 cells (its end-of-text ignored, so it runs to max_tokens) joins:
    the cache drops the other chat's cells for it, and it decodes to the end (llama.cpp's decode fails
    when no cell is free)."""
    from tunejob.engine.batch import Row
    from tunejob.engine.chat import ChatRequest, prompt_inputs
    from tunejob.server.inference.gguf_files import GgufFiles
    from tunejob.server.inference.llama import LlamaBatch, LlamaWeights

    server, _, local = served
    weights = LlamaWeights(GgufFiles(server.data_dir / "gguf", "f32", log=lambda m: None), 2, log=lambda m: None, kv_tokens=512)
    weights.use_threads(1)
    target = weights.target(str(tiny_model), None)

    def run(prompt: str, max_tokens: int, eos: set[int] | None = None) -> Row:
        request = ChatRequest(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0)
        ids = prompt_inputs(target.tokenizer, request, "cpu")["input_ids"][0].tolist()
        row = Row(ids, request, target, weights.stop_ids(target) if eos is None else eos)
        batch = LlamaBatch(weights, target.key, 2)
        batch.join([row])
        while batch.rows:
            batch.finished() or batch.step()
        return row

    cache = weights.loaded(target.key).cache
    first, second = run("zeta", ASK["max_tokens"]), run("alpha beta", ASK["max_tokens"])
    assert [e.tokens for e in cache.entries] == [first.prompt + first.tokens[:-1], second.prompt + second.tokens[:-1]]
    assert target.tokenizer.decode(first.tokens, skip_special_tokens=True).strip() == local["default", "zeta"].content
    whole = run("zeta", 512 - len(first.prompt), eos=set())
    assert whole.cached == len(first.prompt) - 1 and whole.finish == "length" and len(whole.prompt + whole.tokens) == 512
    assert whole.tokens[:len(first.tokens)] == first.tokens  # the cached prefix gave the same answer
    assert cache.entries == []  # both gave their cells up; the whole chat is longer than a quarter of the pool
    assert run("alpha beta", 1).cached < len(second.prompt) - 1

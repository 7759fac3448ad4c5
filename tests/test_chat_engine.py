"""The batched chat engine in-process (server/inference/generation.py + batch.py + weights.py) on a tiny random
model, against transformers' own generate() one request at a time: rows for two adapters and the
bare base in one batch, rows joining mid-flight, merged copies, a seed that holds whatever else is in
the batch, a cancelled or failing row that leaves the others alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tunejob.server.inference.generation import Engine, EngineOptions, Generation
from hf_generate import generate
from tunejob.engine.chat import ChatRequest
from tunejob.train import threads

ASKS = [(None, "alpha beta", 9), (0, "gamma", 14), (1, "delta epsilon zeta", 6), (0, "eta theta iota kappa", 11), (1, "mu", 16)]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Two LoRA adapters with random (non-zero) B, so each changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(2):
        torch.manual_seed(100 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(path := tmp_path_factory.mktemp(f"adapter{i}"))
        out.append(path)
    return out


def _alone(base, adapter, request: ChatRequest) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()
    return generate(model, AutoTokenizer.from_pretrained(base), request).content


def _run(base, requests: list[tuple], options: EngineOptions = EngineOptions(dtype="float32"), cancel_after: dict | None = None,
         stagger: float = 0.0, one_by_one: bool = False):
    """Every (adapter, request) through one engine (at once, `stagger` s apart, or each after the
    last has finished); the results (or exceptions) in order, and the engine's log lines."""
    logs: list[str] = []

    async def collect(i: int, g: Generation):
        pieces = 0
        while True:
            kind, value = await g.next_event(120)
            pieces += kind == "text"
            if cancel_after and i in cancel_after and pieces >= cancel_after[i]:
                g.cancel()
            if kind in ("done", "error"):
                return value

    async def main():
        engine = Engine(threads.budget(1, 1), options=options, log=logs.append)
        loop = asyncio.get_running_loop()
        gens = [Generation(str(base), adapter, req, True, loop) for adapter, req in requests]
        out = []
        for i, g in enumerate(gens):
            engine.submit(g)
            if one_by_one:
                out.append(await collect(i, g))
            await asyncio.sleep(stagger)
        out = out or [await collect(i, g) for i, g in enumerate(gens)]
        engine.stop()
        return out

    return asyncio.run(main()), logs


def test_mixed_adapters_in_one_batch_answer_as_alone(tiny_model, adapters):
    requests = [(adapters[a] if a is not None else None, ChatRequest(messages=[{"role": "user", "content": p}], max_tokens=n, temperature=0))
                for a, p, n in ASKS]
    expected = [_alone(tiny_model, adapter, req) for adapter, req in requests]
    assert len(set(expected[1::2])) > 1 or expected[0] != expected[1]  # the adapters change the answers
    for options, stagger in ((EngineOptions(dtype="float32", merge_mb=0), 0.0), (EngineOptions(dtype="float32", merge_after=1), 0.05)):  # unmerged together; merged, joining late
        results, logs = _run(tiny_model, requests, options, stagger=stagger)
        assert [r.content for r in results] == expected, options
        assert all(r.finish_reason == "length" for r in results)
        assert any(("merged into a copy" if options.merge_after == 1 else "runs unmerged") in line for line in logs), logs


def test_idle_adapters_are_unloaded_past_the_cap(tiny_model, adapters, monkeypatch):
    from tunejob.server.inference import weights

    monkeypatch.setattr(weights, "MAX_ADAPTERS", 1)
    ask = ChatRequest(messages=[{"role": "user", "content": "gamma"}], max_tokens=7, temperature=0)
    order = [adapters[0], adapters[1], adapters[0]]
    results, logs = _run(tiny_model, [(a, ask) for a in order], EngineOptions(dtype="float32", merge_mb=0), one_by_one=True)
    assert [r.content for r in results] == [_alone(tiny_model, a, ask) for a in order]
    assert sum("unloaded (least recently used" in line for line in logs) == 2, logs  # each load past the first unloads the other


def test_a_seed_holds_whatever_else_is_in_the_batch(tiny_model):
    seeded = ChatRequest(messages=[{"role": "user", "content": "alpha"}], max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    alone, _ = _run(tiny_model, [(None, seeded)])
    others = [(None, ChatRequest(messages=[{"role": "user", "content": "beta " * k}], max_tokens=20, temperature=1.0)) for k in (1, 3)]
    crowded, _ = _run(tiny_model, [others[0], (None, seeded), others[1]])
    assert crowded[1].content == alone[0].content
    reseeded, _ = _run(tiny_model, [(None, ChatRequest(**{**seeded.__dict__, "seed": 8}))])
    assert reseeded[0].content != alone[0].content  # the seed is what decides it


def test_a_cancelled_or_failing_row_leaves_the_others_alone(tiny_model, tmp_path):
    keep = ChatRequest(messages=[{"role": "user", "content": "gamma delta"}], max_tokens=15, temperature=0)
    leave = ChatRequest(messages=[{"role": "user", "content": "alpha"}], max_tokens=400, temperature=0)
    results, logs = _run(tiny_model, [(None, leave), (tmp_path / "no-adapter-here", keep), (None, keep)], cancel_after={0: 2})
    assert results[0].finish_reason == "cancelled" and results[0].completion_tokens < 400
    assert isinstance(results[1], Exception)
    assert results[2].content == _alone(tiny_model, None, keep)
    assert any("generation stopped after" in line for line in logs)


def test_bf16_weights_when_asked(tiny_model):
    engine = Engine(threads.budget(1, 1), options=EngineOptions(dtype="bfloat16"), log=lambda m: None)
    target = engine.weights.target(str(tiny_model), None)
    model, _ = engine.weights.forward_model(target, [])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_streamed_text_is_the_answers_text(tiny_model):
    """What a stream sends, joined, is the non-streamed content (the tokenizer's own decode of all
    tokens), for answers with newlines and characters split across tokens, including one cut off by
    the last token (CI once saw a stream drop it while the plain answer kept it as U+FFFD)."""
    import random

    from transformers import AutoTokenizer

    from tunejob.engine.chat import to_result

    tok = AutoTokenizer.from_pretrained(tiny_model)
    words = tok(" alpha beta\ngamma", add_special_tokens=False)["input_ids"]
    half = [i for i in range(len(tok)) if tok.decode([i]).endswith("\ufffd")][:50]  # a byte of a longer character
    assert half and tok.convert_tokens_to_ids("\u010a") in words  # byte-level BPE's newline is among them
    rng = random.Random(0)
    answers = [[rng.choice(half if rng.random() < 0.3 else words) for _ in range(rng.randint(1, 20))] for _ in range(200)]
    answers += [words + [half[0]], [half[0]], [half[0], half[1]], words]
    for tokens in answers:
        gen = Generation("base", None, ChatRequest(messages=[]), stream=True, loop=None)
        streamed = "".join(gen.new_text(tok, tokens[:k], final=k == len(tokens)) for k in range(1, len(tokens) + 1))
        plain = to_result(tok, ChatRequest(messages=[], max_tokens=len(tokens)), 0, tokens, set(), False).content
        assert streamed.strip() == plain, tokens


def test_a_failure_making_an_answer_reaches_its_client_and_frees_its_slot(tiny_model, monkeypatch):
    """Issue 31, finding 5: an exception while a finished row's answer was made (in _progress)
    reached no one: the client waited forever and its queue slot leaked (8 leaks: every chat a 429).
    Now that client gets the error, the others their answers, and the engine's count goes back to 0."""
    from tunejob.server.inference import generation

    real, calls = generation.to_result, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("answer could not be made")
        return real(*args, **kw)

    monkeypatch.setattr(generation, "to_result", flaky)
    asks = [(None, ChatRequest(messages=[{"role": "user", "content": w}], max_tokens=5, temperature=0)) for w in ("alpha", "beta", "gamma")]
    counts = []

    class Spy(Engine):
        def stop(self):
            import time

            deadline = time.time() + 5  # a row is released just after its client is answered, on the engine's thread
            while self._pending and time.time() < deadline:
                time.sleep(0.01)
            counts.append(self._pending)
            super().stop()

    monkeypatch.setattr(generation, "Engine", Spy)
    monkeypatch.setattr(__import__(__name__), "Engine", Spy)
    results, _ = _run(tiny_model, asks)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and "answer could not be made" in str(errors[0])
    assert sum(not isinstance(r, Exception) for r in results) == 2
    assert counts == [0]

"""OpenAI's chat parameters on the local engine (server/inference/generation.py over engine/batch.py), in-process
on the tiny random model, each against something the engine did not compute: transformers'
generate() with the same processors (OpenAI's penalty definition as a LogitsProcessor, its own
stop_strings, its own temperature and top-p warpers, output_scores), or a JSON parser and
jsonschema for response_format."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

from tunejob.engine.text import TextStream, first_stop
from tunejob.server.inference.generation import EngineOptions, Engine, Generation
from tunejob.engine.chat import ChatRequest
from tunejob.train import threads

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "score", "ok", "tag"],
          "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9},
                         "ok": {"type": "boolean"}, "tag": {"type": "string", "maxLength": 6}}}


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory):
    """The tiny model with weights a third as large (init range 0.1): its logits spread 0.8 instead of
    2.4, so a penalty of 1 changes its greedy answer (the usual one never repeats a token in 24, and
    no penalty reaches its top token), while the top two logits stay 3e-3 apart, far above rounding."""
    from tunejob.train.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("flat-model"), init_range=0.1)


@pytest.fixture(scope="module")
def reference(flat_model):
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(flat_model, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(flat_model)


def _ask(prompt: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": prompt}], **kw)


def _run(base, requests: list[ChatRequest]) -> list[tuple[list, list]]:
    """Every request through one engine at once (their rows share batches): per request, its
    results by choice index (or the exception) and the streamed pieces."""
    async def collect(g: Generation):
        results, pieces = [], []
        while True:
            kind, value = await g.next_event(120)
            if kind == "error":
                return [value], pieces
            if kind == "text":
                pieces.append(value)
            elif kind == "done":
                results.append(value)
                if len(results) == g.request.n:
                    return sorted(results, key=lambda r: r.index), pieces

    async def main():
        engine = Engine(threads.budget(1, 1), options=EngineOptions(dtype="float32"), log=lambda m: None)  # generate() compares in fp32
        loop = asyncio.get_running_loop()
        gens = [Generation(str(base), None, r, True, loop) for r in requests]
        for g in gens:
            engine.submit(g)
        out = [await collect(g) for g in gens]
        engine.stop()
        await asyncio.to_thread(engine._thread.join, 10)  # a daemon thread mid-step at exit aborts the interpreter
        return out

    return asyncio.run(main())


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's definition: logits[j] -= c[j] * frequency + (c[j] > 0) * presence, c counting the
    tokens generated so far (not the prompt)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        new = input_ids[:, self.prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def _generate(reference, prompt: str, max_tokens: int, processors=(), **kw):
    model, tok = reference
    inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = inputs["input_ids"].shape[1]
    procs = LogitsProcessorList([p(n) for p in processors])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             logits_processor=procs, output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id, **kw)
    return out.sequences[0, n:].tolist(), out.scores, inputs


PENALTIES = [(1.5, 0.0), (0.0, 0.9), (-2.0, 1.5)]  # the last: a first repeat is favoured, a second one not


def test_penalties_stop_strings_and_logprobs_match_generate(flat_model, reference):
    model, tok = reference
    plain, _, _ = _generate(reference, "alpha", 24)
    text = tok.decode(plain, skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 3]  # three characters from the middle: usually across a token boundary
    asks = [_ask("alpha", max_tokens=24, temperature=0, presence_penalty=p, frequency_penalty=f, logprobs=5) for p, f in PENALTIES]
    asks += [_ask("alpha", max_tokens=24, temperature=0, stop=("never-there", stop)),
             _ask("alpha", max_tokens=24, temperature=0, stop=(stop + "never",))]  # held back, then sent: not a stop after all
    answers = _run(flat_model, asks)

    for (presence, frequency), ([got], pieces) in zip(PENALTIES, answers):
        penalties = lambda n, p=presence, f=frequency: OpenAIPenalties(n, p, f)  # noqa: E731
        tokens, scores, _ = _generate(reference, "alpha", 24, [penalties])
        assert tokens != plain, "the penalty must change the answer for this test to see it"
        assert got.content == tok.decode(tokens, skip_special_tokens=True).strip() and got.completion_tokens == len(tokens)
        # logprobs: generate's processed scores (the penalties applied), log-softmaxed
        assert len(got.logprobs) == len(tokens)
        for entry, token, score in zip(got.logprobs, tokens, scores):
            expected = score[0].log_softmax(-1)
            assert entry["logprob"] == pytest.approx(float(expected[token]), abs=1e-4)
            top = expected.topk(5)
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert b"".join(bytes(e["bytes"]) for e in got.logprobs).decode("utf-8", "replace").strip() == got.content
        streamed = [e for p in pieces for e in (p.logprobs or [])]
        assert streamed == got.logprobs and "".join(p.text for p in pieces).strip() == got.content

    [stopped], pieces = answers[3]
    tokens, _, _ = _generate(reference, "alpha", 24, stop_strings=[stop], tokenizer=tok)
    expected = tok.decode(tokens, skip_special_tokens=True)
    assert first_stop(expected, (stop,)) is not None and tokens != plain
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == len(tokens)  # generate() stops at the same token
    assert stopped.content == expected[: expected.index(stop)].strip()
    assert "".join(p.text for p in pieces) == expected[: expected.index(stop)]  # the stream never sent the stop string

    [unstopped], pieces = answers[4]
    assert unstopped.finish_reason == "length" and unstopped.content == text.strip()
    assert "".join(p.text for p in pieces) == text


class _Model:
    """engine/batch.py's Target and Weights for one plain model (as train/rollout.py gives them)."""

    adapter, key = None, ("model",)

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def forward_model(self, target, adapters):
        return self.model, None


def test_sampled_logprobs_are_of_the_distribution_drawn_from(reference):
    """Temperature then top-p (transformers' own warpers, in generate()'s order), log-softmaxed: the
    chosen token's logprob, and top_logprobs without the tokens top-p left out (-inf, not JSON)."""
    from tunejob.engine.batch import Batch, Row

    model, tok = reference
    ids = tok.apply_chat_template([{"role": "user", "content": "beta"}], add_generation_prompt=True, return_dict=True)["input_ids"]
    target = _Model(model, tok)
    row = Row(list(ids), _ask("beta", max_tokens=10, temperature=0.1, top_p=0.5, seed=3, logprobs=20), target, {tok.eos_token_id})
    batch = Batch(target, target.key, 1)
    batch.join([row])
    while not batch.finished():
        batch.step()
    full = torch.tensor([list(ids) + row.tokens])
    with torch.no_grad():
        logits = model(full).logits[0, len(ids) - 1: -1]
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.1), TopPLogitsWarper(0.5)])
    assert [e.token for e in row.decoding.logprobs] == row.tokens
    for k, entry in enumerate(row.decoding.logprobs):
        scores = warp(full[:, : len(ids) + k], logits[k: k + 1].clone())[0].log_softmax(-1)
        assert entry.logprob == pytest.approx(float(scores[entry.token]), abs=1e-4)
        finite = int(torch.isfinite(scores).sum())
        assert len(entry.top) == min(20, finite)
        assert [t for t, _ in entry.top] == scores.topk(len(entry.top)).indices.tolist()
    assert any(len(e.top) < 20 for e in row.decoding.logprobs)  # top-p did cut some steps' candidates


def test_n_choices_each_draw_with_their_own_seed(tiny_model):
    asks = [_ask("gamma", max_tokens=8, temperature=1.0, seed=11, n=3)] + [_ask("gamma", max_tokens=8, temperature=1.0, seed=11 + i) for i in range(3)]
    answers = _run(tiny_model, asks)
    choices, pieces = answers[0]
    assert [c.index for c in choices] == [0, 1, 2] and len({c.content for c in choices}) > 1
    assert [c.content for c in choices] == [a[0][0].content for a in answers[1:]]  # choice i is the request with seed + i
    for i, choice in enumerate(choices):
        assert "".join(p.text for p in pieces if p.index == i).strip() == choice.content


def test_response_format_is_enforced_on_a_model_that_writes_noise(tiny_model):
    """The random model writes no JSON by itself; constrained, its answers parse and fit the schema.
    json_object lets a string run on (this model never closes one): it may end at max_tokens, cut,
    so here only the schema's bounded answer is asserted complete."""
    from jsonschema import validate

    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    asks = [_ask(p, max_tokens=60, temperature=t, seed=1, response_format=fmt) for p, t in (("alpha", 0), ("beta gamma", 1.0))]
    asks += [_ask("alpha", max_tokens=60, temperature=0), _ask("alpha", max_tokens=12, temperature=0, response_format={"type": "json_object"})]
    answers = _run(tiny_model, asks)
    for [result], pieces in answers[:2]:
        assert result.finish_reason == "stop", result
        validate(json.loads(result.content), SCHEMA)
        assert "".join(p.text for p in pieces).strip() == result.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(answers[2][0][0].content)
    assert answers[3][0][0].content.startswith("{")  # cut at 12 tokens, but JSON so far


def test_a_real_model_answers_json_mode_with_an_object():
    from tunejob.train.models import default_model_path

    [([result], _)] = _run(default_model_path(), [_ask('Return {"ok": true} as JSON.', max_tokens=30, temperature=0,
                                                       response_format={"type": "json_object"})])
    assert result.finish_reason == "stop" and isinstance(json.loads(result.content), dict)


STOP_WORDS = [" alpha", " beta", "\n", " gam", "ma", "\n\n", "é"]


def test_a_stream_never_sends_a_stop_string(tiny_model, reference):
    """Random answers from words, newlines and split characters, with stop strings across tokens
    and across newlines: the stream sends exactly the text before the first stop string, every
    prefix of it free of stop strings, and all of an answer a stop string never ends."""
    _, tok = reference
    pieces = [tok(w, add_special_tokens=False)["input_ids"] for w in STOP_WORDS]
    rng = random.Random(0)
    for _ in range(300):
        tokens = [t for _ in range(rng.randint(1, 14)) for t in rng.choice(pieces)]
        stops = tuple(rng.sample(["a\nb", " gamma\n", "\n\n", "ta b", "é a", "zz"], 2))
        full = tok.decode(tokens, skip_special_tokens=True)
        cut = first_stop(full, stops)
        end = next((k for k in range(1, len(tokens) + 1) if first_stop(tok.decode(tokens[:k], skip_special_tokens=True), stops) is not None),
                   len(tokens))  # the engine stops at the token that completes a stop string
        stream, sent = TextStream(stops), ""
        for k in range(1, end + 1):
            sent += stream.new_text(tok, tokens[:k], final=k == end)
            assert first_stop(sent, stops) is None, (tokens, stops, sent)
        assert sent == (full if cut is None else full[:cut]), (tokens, stops)

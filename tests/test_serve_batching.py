"""Batched chat in tunejob serve: several clients at once (the official openai SDK over real HTTP on
127.0.0.1), asking the base model and a fine-tuned one (rows of one base with and without its
adapter share forward passes; from the adapter's second request on it runs merged), get the answers
the model gives one request at a time: transformers' own generate(), greedy, fp32, adapter
unmerged (peft), in this process. The only exception allowed is a near-tie in that reference (its
top-2 logits within 1e-4 at the first token where the answers part), where rounding decides."""

from __future__ import annotations

import functools
import threading
import time

import torch

from conftest import write_chat_data
from test_serve import Server, client, wait_status

NEAR_TIE = 1e-4
PROMPTS = [("alpha beta gamma", 12), ("delta", 30), ("epsilon zeta eta theta iota kappa", 5), ("mu nu", 21),
           ("xi omicron pi rho", 17), ("sigma", 9)]


@functools.lru_cache(maxsize=4)
def _model(base: str, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval(), AutoTokenizer.from_pretrained(base)


def _reference(base: str, adapter, prompt: str, max_tokens: int) -> tuple[list[int], list[float], object]:
    """One request alone: generate()'s greedy tokens and each step's top-2 logit gap."""
    model, tok = _model(base, adapter)
    inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), gaps, tok


def _agrees(answer: str, reference: tuple) -> bool:
    """The server's answer is the reference's, or they part where the reference had a near-tie."""
    tokens, gaps, tok = reference
    if answer == tok.decode(tokens, skip_special_tokens=True).strip():
        return True
    for k in range(len(tokens)):
        if not answer.startswith(tok.decode(tokens[: k + 1], skip_special_tokens=True).strip()):
            return gaps[k] < NEAR_TIE
    return False


def _explain(answer: str, reference: tuple) -> str:
    tokens, gaps, tok = reference
    for k in range(len(tokens)):
        if not answer.startswith(tok.decode(tokens[: k + 1], skip_special_tokens=True).strip()):
            return f"reference {tok.decode(tokens, skip_special_tokens=True)!r}; parts at token {k} (gap {gaps[k]:.2e})"
    return f"reference {tok.decode(tokens, skip_special_tokens=True)!r}; the answer runs on"


def test_concurrent_chats_answer_as_one_at_a_time(tmp_path, tiny_model):
    # the torch engine in fp32 pinned: the claim is token identity with fp32 generate() (bf16, where auto picks it,
    # and llama.cpp's f16, which the default engine runs on a CPU, follow their own rounding) and its merging
    server = Server(tmp_path / "data", tiny_model, ("--engine", "local", "--chat-queue", str(2 * len(PROMPTS)), "--chat-dtype", "float32")).start()
    try:
        c = client(server)
        f = c.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", 12), "rb"), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters={"n_epochs": 1, "learning_rate_multiplier": 50})
        ft = wait_status(c, job.id, ("succeeded",)).fine_tuned_model
        adapter = server.data_dir / "jobs" / job.id / "run" / "best"
        asks = [(model, prompt, n) for model in ("default", ft) for prompt, n in PROMPTS]
        refs = {(m, p): _reference(str(tiny_model), adapter if m == ft else None, p, n) for m, p, n in asks}
        assert refs[("default", "delta")][0] != refs[(ft, "delta")][0], "the adapter must change the answer for this test to see it"

        answers: dict = {}

        def ask(model: str, prompt: str, n: int, stream: bool) -> None:
            me = client(server)
            messages = [{"role": "user", "content": prompt}]
            if stream:
                parts = [p.choices[0].delta.content or "" for p in me.chat.completions.create(
                    model=model, messages=messages, max_tokens=n, temperature=0, stream=True) if p.choices]
                answers[(model, prompt, "stream")] = "".join(parts).strip()
            else:
                answers[(model, prompt, "plain")] = me.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0).choices[0].message.content

        for round_ in range(2):  # round 1: the adapter unmerged beside base rows; round 2: merged (its 2nd request on)
            workers = [threading.Thread(target=ask, args=(m, p, n, (i + round_) % 2 == 0)) for i, (m, p, n) in enumerate(asks)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(timeout=120)
        assert len(answers) == 2 * len(asks), sorted(answers)
        wrong = {k: (v, _explain(v, refs[k[:2]])) for k, v in answers.items() if not _agrees(v, refs[k[:2]])}
        assert not wrong, wrong
        log = server.log.read_text()
        assert "runs unmerged on its base" in log and "merged into a copy of its base" in log, log[-2000:]
    finally:
        server.stop()


def test_a_long_answer_does_not_hold_back_short_ones(tmp_path, long_context_model):
    server = Server(tmp_path / "data", long_context_model).start()
    try:
        c = client(server)
        c.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=1)  # loaded
        long_done: list[float] = []

        def long() -> None:
            for _ in client(server).chat.completions.create(model="default", messages=[{"role": "user", "content": "alpha"}],
                                                            max_tokens=4000, temperature=0, stream=True):
                pass
            long_done.append(time.time())

        t = threading.Thread(target=long)
        t.start()
        time.sleep(1.0)  # the long answer is generating
        short = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "beta"}], max_tokens=3, temperature=0)
        short_done = time.time()
        t.join(timeout=300)
        # One at a time, the short answer would wait for all 4,000 tokens of the long one (400 were
        # done in about a second on a fast CPU: the long answer ended before the short one began).
        assert short.choices[0].finish_reason == "length" and long_done and short_done < long_done[0]
    finally:
        server.stop()

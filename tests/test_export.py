"""GGUF and Ollama export, checked against the world: each written file is read back by
transformers' own GGUF loader (the path the embedded SmolLM2 comes in by) and by llama.cpp
(llama-cpp-python, slow tier), and its logits, chat rendering and greedy stop are compared with
the PEFT model (base + adapter, unmerged) the file was made from.

Tiny models: 2 layers, hidden 64, 4 heads of 16, 2 KV heads, the embedded SmolLM2 tokenizer
(49,152 tokens), a random LoRA on every linear layer. Reading a file back costs most of the time
(gguf's reader parses ~100k tokens and merges), so each file is parsed once per test session.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli, write_chat_data

PROMPTS = ["The capital of France is", "alpha beta gamma delta", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}
BOUNDS = {"f32": 1e-4, "f16": 1e-2, "q8_0": 5e-2}  # largest |logit difference| allowed


@pytest.fixture(autouse=True)
def parse_each_file_once(monkeypatch):
    """transformers parses a GGUF file for its config, again for its tensors, again for the
    tokenizer; one reader per path serves all three (~7 s each on 2 cores otherwise)."""
    import gguf

    monkeypatch.setattr(gguf, "GGUFReader", _cached_reader(gguf.GGUFReader))


@functools.cache
def _cached_reader(cls):
    return functools.lru_cache(maxsize=8)(lambda path, mode="r": cls(path, mode))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from tunejob.train.models import default_tokenizer_path

    return default_tokenizer_path()


def tiny_base(family: str, out: Path, tokenizer_dir: Path) -> Path:
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        initializer_range=0.3, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{"tie_word_embeddings": False, **extra})
    if family == "qwen2":
        config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def adapted_checkpoint(base: Path, ckpt: Path, data: Path | None = None, scale: float = 0.05):
    """A checkpoint directory as training writes one (adapter + config.yaml) with a random,
    non-zero LoRA on every linear layer; returns (dir, the live PEFT model for reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, scale)
    peft_model.save_pretrained(ckpt)
    spec = {"model": str(base), "data": {"train": str(data or write_chat_data(ckpt.parent / "train.jsonl", 8))},
            "output_dir": str(ckpt.parent)}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(spec))
    return ckpt, peft_model.eval()


def logits_of(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(ids).logits[0]


def read_back(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_reads_back_with_the_same_logits(tmp_path, tokenizer_dir, family):
    from transformers import AutoTokenizer

    from tunejob.export.gguf_model import export_gguf

    base = tiny_base(family, tmp_path / "base", tokenizer_dir)
    ckpt, reference = adapted_checkpoint(base, tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    done = export_gguf(ckpt, tmp_path / "m.gguf", kind="f32")
    assert done["end_of_turn"] == "<|im_end|>"
    back = read_back(tmp_path / "m.gguf")
    for prompt in PROMPTS:
        want, got = logits_of(reference, tokenizer, prompt), logits_of(back, tokenizer, prompt)
        assert want.abs().max() > 1.0  # logits big enough for the bound to mean something
        assert (want - got).abs().max() < BOUNDS["f32"], (family, prompt)


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct with a small random adapter (the training data share a
    system prompt, which --ollama must carry)."""
    from tunejob.train.models import default_model_path

    root = tmp_path_factory.mktemp("smollm2")
    data = write_chat_data(root / "train.jsonl", 8, system="Answer in capitals.")
    ckpt, reference = adapted_checkpoint(default_model_path(), root / "ckpt", data, scale=0.01)
    return ckpt, reference


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_smollm2_types_stay_within_their_bounds(tmp_path, smollm2_run, kind):
    from transformers import AutoTokenizer

    from tunejob.export.gguf_model import export_gguf

    ckpt, reference = smollm2_run
    tokenizer = AutoTokenizer.from_pretrained(str(Path(yaml.safe_load((ckpt / "config.yaml").read_text())["model"])))
    export_gguf(ckpt, tmp_path / f"m-{kind}.gguf", kind=kind)
    back = read_back(tmp_path / f"m-{kind}.gguf")
    worst = max((logits_of(reference, tokenizer, p) - logits_of(back, tokenizer, p)).abs().max().item() for p in PROMPTS)
    print(f"{kind}: largest |logit difference| {worst:.2e}")
    assert worst < BOUNDS[kind]

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
# f32: largest |logit difference|. f16 / q8_0 on the 30-layer SmolLM2: largest |logit difference|
# relative to the largest |logit| (absolute f16 error grows with depth and logit size: 3.2e-2 on
# logits up to ~20). The q8_0 bound is 5x the f16 one.
BOUNDS = {"f32": 1e-4, "f16": 1e-2, "q8_0": 5e-2}


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


def adapted_checkpoint(base: Path, ckpt: Path, data: Path | None = None, scale: float = 0.05, **lora):
    """A checkpoint directory as training writes one (adapter + config.yaml) with a random,
    non-zero LoRA on every linear layer (`lora`: more LoraConfig settings); returns (dir, the live
    PEFT model for reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora))
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


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_run, tmp_path_factory):
    """kind -> the SmolLM2 run exported at that type, written once for all tests (~10 s each)."""
    from tunejob.export.gguf_model import export_gguf

    root, written = tmp_path_factory.mktemp("smollm2-gguf"), {}

    def get(kind: str) -> Path:
        if kind not in written:
            written[kind] = Path(export_gguf(smollm2_run[0], root / f"m-{kind}.gguf", kind=kind)["path"])
        return written[kind]
    return get


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_smollm2_types_stay_within_their_bounds(smollm2_run, smollm2_gguf, kind):
    from transformers import AutoTokenizer

    ckpt, reference = smollm2_run
    tokenizer = AutoTokenizer.from_pretrained(str(Path(yaml.safe_load((ckpt / "config.yaml").read_text())["model"])))
    back = read_back(smollm2_gguf(kind))
    worst, agree = 0.0, []
    for prompt in PROMPTS:
        want, got = logits_of(reference, tokenizer, prompt), logits_of(back, tokenizer, prompt)
        worst = max(worst, ((want - got).abs().max() / want.abs().max()).item())
        agree.append((want.argmax(-1) == got.argmax(-1)).float().mean().item())
    print(f"{kind}: largest |logit difference| / largest |logit| {worst:.2e}; top-1 agreement {min(agree):.3f}")
    assert worst < BOUNDS[kind]


def _eot_of(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name one colour."}]


def test_smollm2_chat_template_and_greedy_stop_survive_the_file(smollm2_run, smollm2_gguf):
    """transformers' GGUF tokenizer renders conversations as the original does, and greedy
    generation from the (f16) file's model gives the adapter's tokens and ends at <|im_end|>."""
    from transformers import AutoTokenizer

    ckpt, reference = smollm2_run
    original = AutoTokenizer.from_pretrained(str(Path(yaml.safe_load((ckpt / "config.yaml").read_text())["model"])))
    path = smollm2_gguf("f16")
    from_file = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for messages in (CHAT, CHAT[1:], [*CHAT, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]):
        for prompt in (True, False):
            want = original.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert from_file.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == want
            assert from_file(want, add_special_tokens=False).input_ids == original(want, add_special_tokens=False).input_ids
    back = read_back(path)
    ids = original.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        want = reference.generate(input_ids=ids, max_new_tokens=48, do_sample=False, eos_token_id=_eot_of(original))[0, ids.shape[1]:]
        got = back.generate(input_ids=ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:]  # the file's own EOS
    assert got.tolist() == want.tolist()
    assert got[-1].item() == _eot_of(original) and len(got) < 48, original.decode(got)


def test_unsupported_family_and_template_fail_in_one_line(tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config

    from tunejob.errors import ModelError
    from tunejob.export.modelfile import template_style
    from tunejob.export.tensors import family_of

    with pytest.raises(ModelError, match=r"supports model types llama, mistral, qwen2, gemma3_text .*this model is 'gpt2'"):
        family_of(GPT2Config())
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert template_style(tokenizer) == "chatml"
    tokenizer.chat_template = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    with pytest.raises(ModelError, match="not ChatML"):
        template_style(tokenizer)


def test_ollama_export_writes_gguf_modelfile_and_the_create_line(tmp_path, tokenizer_dir):
    from tunejob.export.modelfile import CHATML_TEMPLATE

    base = tiny_base("llama", tmp_path / "base", tokenizer_dir)
    data = write_chat_data(tmp_path / "train.jsonl", 6, system="Answer in capitals.")
    ckpt, _ = adapted_checkpoint(base, tmp_path / "run" / "ckpt", data)
    res = run_cli("export", str(ckpt), "--ollama", str(tmp_path / "ollama"), "--type", "q8_0")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "ollama"
    assert f"ollama create ckpt -f {out / 'Modelfile'}" in res.stdout
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """Answer in capitals."""' in text
    import gguf

    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == 2
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}


def test_gguf_adapter_holds_the_lora_delta_in_llama_cpp_layout(tmp_path, tokenizer_dir):
    """B·A·alpha/r from the file, with transformers' GGUF loader's un-permutation, equals PEFT's delta."""
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tunejob.export.lora_gguf import write_adapter

    base = tiny_base("llama", tmp_path / "base", tokenizer_dir)
    ckpt, peft_model = adapted_checkpoint(base, tmp_path / "ckpt")
    config = AutoConfig.from_pretrained(str(base))
    write_adapter(ckpt, config, tmp_path / "a.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert len(tensors) == 2 * 7 * config.num_hidden_layers
    unpermute = LlamaTensorProcessor(config=config.to_dict())
    for module, gguf_name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("down_proj", "ffn_down")):
        layer = peft_model.base_model.model.model.layers[1]
        lin = getattr(layer.self_attn if "proj" in module and module[0] in "qk" else layer.mlp, module)
        want = (lin.lora_B["default"].weight @ lin.lora_A["default"].weight) * 2.0  # alpha 8 / r 4
        got = tensors[f"blk.1.{gguf_name}.weight.lora_b"] @ tensors[f"blk.1.{gguf_name}.weight.lora_a"] * 2.0
        got = torch.from_numpy(unpermute.process(got.numpy(), f"blk.1.{gguf_name}.weight").weights.copy())
        assert torch.allclose(got, want.detach(), atol=1e-6), module


def _llama_cpp_greedy(path: Path, prompt_ids: list[int], n: int, stop: int | None = None, lora: Path | None = None) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=2, verbose=False)
    out: list[int] = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n or token == stop:
            break
    return out


def _hf_greedy(model, prompt_ids: list[int], n: int, stop: int | None = None) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=0 if stop else n,
                             do_sample=False, eos_token_id=stop, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.slow
def test_llama_cpp_reads_each_file_and_generates_the_adapters_tokens(tmp_path, tokenizer_dir, smollm2_run, smollm2_gguf):
    """llama.cpp (llama-cpp-python) loads every written file, tokenizes as transformers does,
    gives the PEFT model's greedy tokens, stops at <|im_end|>, and applies the GGUF adapter."""
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunejob.export.gguf_model import export_gguf, write_gguf
    from tunejob.export.lora_gguf import export_adapter

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(chat, add_special_tokens=False).input_ids
    for family in FAMILIES:
        base = tiny_base(family, tmp_path / family / "base", tokenizer_dir)
        ckpt, reference = adapted_checkpoint(base, tmp_path / family / "ckpt")
        path = tmp_path / family / "m.gguf"
        export_gguf(ckpt, path, kind="f32")
        vocab_model = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
        assert vocab_model.tokenize(chat.encode(), add_bos=False, special=True) == prompt, family
        assert _llama_cpp_greedy(path, prompt, 8) == _hf_greedy(reference, prompt, 8), family
        if family == "llama":  # the adapter file on the plain base gives the merged model's tokens
            plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            write_gguf(plain, AutoTokenizer.from_pretrained(str(base)), base, tmp_path / "base.gguf", "f32")
            export_adapter(ckpt, tmp_path / "lora.gguf", kind="f32")
            assert _llama_cpp_greedy(tmp_path / "base.gguf", prompt, 8, lora=tmp_path / "lora.gguf") == _hf_greedy(reference, prompt, 8)

    reference, path, eot = smollm2_run[1], smollm2_gguf("q8_0"), _eot_of(tokenizer)
    want = _hf_greedy(reference, prompt, 48, stop=eot)
    got = _llama_cpp_greedy(path, prompt, 48, stop=eot)
    assert want[-1] == eot and got == want, (tokenizer.decode(want), tokenizer.decode(got))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    done = llm.create_completion(prompt, max_tokens=48, temperature=0.0, top_k=1, repeat_penalty=1.0)
    assert done["choices"][0]["finish_reason"] == "stop"  # llama.cpp's own end-of-generation check


def test_checkpoint_choice_and_a_missing_output_fail_in_one_line(tmp_path):
    from tunejob.errors import ModelError
    from tunejob.export.gguf_model import choose_checkpoint

    for step in (4, 8):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step:06d}" / "state.json").write_text(json.dumps({"step": step}))
    assert choose_checkpoint(tmp_path, "step-8") == tmp_path / "checkpoints" / "step-000008"
    assert choose_checkpoint(tmp_path, "step-000004") == tmp_path / "checkpoints" / "step-000004"
    with pytest.raises(ModelError, match="use best or one of: step-4, step-8"):
        choose_checkpoint(tmp_path, "step-5")
    res = run_cli("export", str(tmp_path))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "--gguf OUT.gguf" in res.stderr

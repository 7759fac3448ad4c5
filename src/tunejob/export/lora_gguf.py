"""The LoRA adapter alone as a GGUF adapter, for `llama-cli -m base.gguf --lora adapter.gguf`.

Laid out as llama.cpp's convert_lora_to_gguf.py writes one: general.type=adapter,
adapter.type=lora, adapter.lora.alpha, and per adapted weight `<gguf name>.lora_a` (r x in) and
`.lora_b` (out x r). llama.cpp scales B·A by alpha / r itself. Llama's q/k rows are permuted like
the base weights; only B has those rows, so only B is permuted.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunejob.errors import ModelError
from tunejob.export.tensors import family_of, gguf_file, permute

PREFIX = "base_model.model."


def adapter_tensors(state: dict, config, kind: str):
    """Yield (gguf name, array, GGMLQuantizationType) for each lora_A / lora_B in a PEFT state dict."""
    import gguf

    fam = family_of(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch], config.num_hidden_layers)
    for key in sorted(state):
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ModelError(f"{key}: the adapter holds more than LoRA matrices (modules_to_save?); GGUF adapters carry lora_A/lora_B only")
        module, part = key.removeprefix(PREFIX).split(".lora_")
        base = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if base is None:
            raise ModelError(f"{module}: no llama.cpp tensor for this adapted layer")
        data = state[key].float().numpy()
        if part.startswith("B") and fam.permute_qk and module.endswith("q_proj"):
            data = permute(data, config.num_attention_heads, config.num_attention_heads)
        elif part.startswith("B") and fam.permute_qk and module.endswith("k_proj"):
            data = permute(data, config.num_attention_heads, config.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType.F32 if kind == "f32" else gguf.GGMLQuantizationType.F16
        if kind == "q8_0" and data.shape[-1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
        yield f"{base}.lora_{part[0].lower()}", gguf.quants.quantize(data, qtype), qtype


def write_adapter(checkpoint_dir: Path, config, out: str | Path, kind: str = "f16") -> Path:
    import gguf
    from safetensors.torch import load_file

    settings = json.loads((checkpoint_dir / "adapter_config.json").read_text())
    if settings.get("use_rslora") or settings.get("use_dora"):
        raise ModelError("--gguf-adapter: rsLoRA / DoRA adapters have no llama.cpp equivalent; use --gguf (merged) instead")
    state = load_file(str(checkpoint_dir / "adapter_model.safetensors"))
    out = Path(out)
    with gguf_file(out, family_of(config).arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(settings["lora_alpha"]))
        for name, data, qtype in adapter_tensors(state, config, kind):
            writer.add_tensor(name, data, raw_dtype=qtype)
    return out


def export_adapter(run_dir: str | Path, out: str | Path, checkpoint: str = "best", kind: str = "f16") -> dict:
    """`tunejob export RUN_DIR --gguf-adapter OUT`: the chosen checkpoint's LoRA as a GGUF adapter."""
    from transformers import AutoConfig

    from tunejob.evaluate.chat import base_model_of
    from tunejob.export.gguf_model import choose_checkpoint

    ckpt = choose_checkpoint(run_dir, checkpoint)
    config = AutoConfig.from_pretrained(base_model_of(ckpt))
    return {"path": str(write_adapter(ckpt, config, out, kind)), "checkpoint": str(ckpt)}

"""A transformers model's weights as GGUF tensors: llama.cpp's names, its q/k layout, its types.

Names come from the `gguf` package's TensorNameMap (`model.layers.3.self_attn.q_proj.weight` ->
`blk.3.attn_q.weight`). Types follow convert_hf_to_gguf.py: 1-D tensors and norms stay F32;
matrices become F32, F16 or Q8_0 (blocks of 32 along a row; a row not divisible by 32 falls back
to F16, as the converter does).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunejob.errors import ModelError


@dataclass(frozen=True)
class Family:
    arch: str            # gguf.MODEL_ARCH member name
    permute_qk: bool     # llama.cpp's LLAMA arch rotates interleaved pairs; HF rotates halves
    norm_offset: float = 0.0  # added to every *norm.weight: Gemma's RMSNorm scales by (1 + w), llama.cpp's by w


# model_type -> how llama.cpp runs it. Mistral runs as LLAMA, as convert_hf_to_gguf.py maps it
# (the converter drops the sliding window too: llama.cpp's LLAMA attends to the full context).
FAMILIES = {
    "llama": Family("LLAMA", True),
    "mistral": Family("LLAMA", True),
    "qwen2": Family("QWEN2", False),  # QWEN2 uses NEOX rope: the HF halves layout as is
    # Gemma 3 as convert_hf_to_gguf.py's Gemma3Model writes it (NEOX rope, norms + 1), which is
    # what transformers' GGUF loader undoes (Gemma2TensorProcessor: norm.weight - 1)
    "gemma3_text": Family("GEMMA3", False, norm_offset=1.0),
}
TYPES = ("f32", "f16", "q8_0")


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelError(
            f"GGUF export supports model types {', '.join(FAMILIES)} (Llama, SmolLM2, Mistral, Qwen2, Gemma 3); "
            f"this model is {model_type!r}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    for part in [rope, *(v for v in rope.values() if isinstance(v, dict))]:  # Gemma 3: one per attention type
        if part.get("rope_type", "default") != "default":
            raise ModelError(f"GGUF export supports default RoPE only; this model uses rope_type {part['rope_type']!r}")
    return FAMILIES[model_type]


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's q/k rows hold each head's rotary pairs as
    two halves; llama.cpp's LLAMA rope wants them interleaved. transformers' GGUF loader undoes it
    (LlamaTensorProcessor._reverse_permute_weights)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def file_type(kind: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]


def _qtype(name: str, data: np.ndarray, kind: str):
    import gguf

    if data.ndim <= 1 or name.endswith("_norm.weight") or kind == "f32":
        return gguf.GGMLQuantizationType.F32
    if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def gguf_tensors(state_dict: dict, config, kind: str):
    """Yield (gguf name, array, GGMLQuantizationType) for every weight llama.cpp needs."""
    import gguf

    fam = family_of(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch], config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd, as for any converted tied model
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"{hf_name}: no llama.cpp tensor for this weight; GGUF export supports {', '.join(FAMILIES)} layouts")
        data = tensor.detach().to("cpu").float().numpy()
        if fam.norm_offset and hf_name.endswith("norm.weight"):
            data = data + np.float32(fam.norm_offset)
        if fam.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head, n_head)
        elif fam.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_head, n_kv)
        qtype = _qtype(name, data, kind)
        yield name, gguf.quants.quantize(data, qtype), qtype


@contextlib.contextmanager
def gguf_file(out: str | Path, arch: str):
    """A GGUFWriter for `out` of llama.cpp architecture `arch`: written beside it and renamed into
    place once complete, so a crash never leaves a truncated file under the final name."""
    import gguf

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)

"""A trained run as one GGUF file: the base model with the LoRA adapter merged in, its tokenizer,
special tokens and chat template, for llama.cpp, Ollama, LM Studio and transformers' GGUF loader.

    tunejob export runs/demo --gguf demo.gguf --type q8_0
"""

from __future__ import annotations

from pathlib import Path

from tunejob.errors import ModelError
from tunejob.export.tensors import TYPES, family_of, file_type, gguf_file, gguf_tensors


def choose_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """`best` (the run's best evaluation), `step-N`, or a checkpoint directory given directly."""
    from tunejob.evaluate.chat import run_checkpoint
    from tunejob.train.checkpoint import list_checkpoints

    if which == "best":
        return run_checkpoint(run_dir)
    steps = dict(list_checkpoints(Path(run_dir)))
    try:
        step = int(which.removeprefix("step-"))
    except ValueError:
        step = None
    if step not in steps:
        have = ", ".join(f"step-{s}" for s in sorted(steps)) or "none yet"
        raise ModelError(f"checkpoint {which!r}: not in {run_dir}; use best or one of: {have}")
    return steps[step]


def merged_model(checkpoint_dir: Path):
    """(merged fp32 model, tokenizer, base model folder)."""
    from tunejob.evaluate.chat import base_model_of, load_for_chat

    model, tokenizer = load_for_chat(checkpoint_dir, merge=True)
    return model.merge_and_unload(), tokenizer, Path(base_model_of(checkpoint_dir))


def add_hyperparameters(writer, config, kind: str) -> None:
    """The architecture keys llama.cpp reads (as convert_hf_to_gguf.py's TextModel writes them)."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if getattr(config, "model_type", None) == "gemma3_text":
        _add_gemma3(writer, config, head_dim)
        rope = rope["full_attention"]  # the global layers' base; the sliding ones' is written by _add_gemma3
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type(kind))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_gemma3(writer, config, head_dim: int) -> None:
    """Gemma 3's extras: the sliding window and its layers' RoPE base. llama.cpp places a global
    layer every 6th (layer_types' pattern in every Gemma 3 config) and scales queries by
    1/sqrt(head_dim), so a config that differs would run wrongly there: refused."""
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if list(config.layer_types) != pattern or config.query_pre_attn_scalar != head_dim:
        raise ModelError("GGUF export: this Gemma 3 config's attention layout (layer_types, query_pre_attn_scalar) is not "
                         "the one llama.cpp runs Gemma 3 with")
    writer.add_sliding_window(config.sliding_window)
    writer.add_rope_freq_base_swa(float(config.rope_parameters["sliding_attention"]["rope_theta"]))


def write_gguf(model, tokenizer, tokenizer_dir: Path, out: str | Path, kind: str = "f16", name: str | None = None) -> str | None:
    """Write `model` (a plain transformers model) as one GGUF file, atomically; return the
    end-of-turn token the file stops generation at."""
    import gguf

    from tunejob.export.vocab import add_vocab

    if kind not in TYPES:
        raise ModelError(f"--type {kind}: choose one of {', '.join(TYPES)}")
    config = model.config
    fam = family_of(config)
    out = Path(out)
    with gguf_file(out, fam.arch) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or out.stem)
        add_hyperparameters(writer, config, kind)
        eot = add_vocab(writer, tokenizer, tokenizer_dir, config.vocab_size)
        for tensor_name, data, qtype in gguf_tensors(model.state_dict(), config, kind):
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    return eot


def export_gguf(run_dir: str | Path, out: str | Path, checkpoint: str = "best", kind: str = "f16") -> dict:
    """`tunejob export RUN_DIR --gguf OUT`: the chosen checkpoint merged into its base, as GGUF."""
    ckpt = choose_checkpoint(run_dir, checkpoint)
    model, tokenizer, base_dir = merged_model(ckpt)
    eot = write_gguf(model, tokenizer, base_dir, out, kind, name=Path(run_dir).resolve().name)
    return {"path": str(out), "checkpoint": str(ckpt), "type": kind, "end_of_turn": eot}

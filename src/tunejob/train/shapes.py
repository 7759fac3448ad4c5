"""A model's linear-layer shapes, and what a LoRA config trains on them.

Read from the real modules (built on the meta device from config.json: no weights, no memory),
so the counts hold for any architecture transformers knows. LoRA on a d_in x d_out matrix trains
r x (d_in + d_out) parameters: r=16 on 4096x4096 is 131,072 instead of 16.7M; q_proj+v_proj of a
32-layer 4096-wide model (Llama-2-7B) at r=16 is 32 x 2 x 131,072 = 8.4M.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunejob.errors import ModelError

ATTENTION_TARGETS = [("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("Wqkv",)]
_LINEAR_TYPES = {"Linear", "Linear4bit", "Linear8bitLt", "Conv1D"}


@dataclass
class ModelShape:
    linears: list[tuple[str, int, int]]  # (qualified name, in_features, out_features), lm_head included
    total_params: int
    embedding_params: int  # input embeddings (+ lm_head when untied)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    output_layer: str = "lm_head"
    tied: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def linear_names(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[-1] for n, _, _ in self.linears})


def shape_of(model) -> ModelShape:
    """The shape of a loaded (or meta-device) causal LM."""
    cfg = model.config
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    linears = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in _LINEAR_TYPES and hasattr(mod, "in_features"):
            linears.append((name, int(mod.in_features), int(mod.out_features)))
        elif type(mod).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
            w = mod.weight
            linears.append((name, int(w.shape[0]), int(w.shape[1])))
    emb = model.get_input_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    emb_params = emb.weight.numel() + (0 if tied or head is None else head.weight.numel())
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    return ModelShape(
        linears=linears,
        total_params=sum(p.numel() for p in model.parameters()),
        embedding_params=emb_params,
        hidden=hidden,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * hidden,
        layers=getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0),
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        vocab=getattr(cfg, "vocab_size", 0),
        output_layer=head_name,
        tied=tied,
    )


def shape_from_path(model_path: str) -> ModelShape:
    """Shape from a model folder's config.json, without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_path}: cannot read config.json ({exc})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return shape_of(model)


def resolve_targets(linear_names: list[str], target: str | list[str], output_layer: str = "lm_head") -> list[str] | str:
    """Module names for a spec's target_modules, or a clear error naming what exists."""
    if target == "all-linear":
        return "all-linear"
    if target == "attention":
        for group in ATTENTION_TARGETS:
            if all(g in linear_names for g in group):
                return list(group)
        raise ModelError(f"lora.target_modules: no attention projections found; linear modules here: {', '.join(linear_names)}")
    missing = [t for t in target if t not in linear_names]
    if missing:
        raise ModelError(f"lora.target_modules: {', '.join(missing)} not found in the base model; linear modules here: {', '.join(linear_names)}")
    return list(target)


def targeted(shape: ModelShape, target: str | list[str]) -> list[tuple[str, int, int]]:
    """The linear layers a target spec selects (peft's all-linear leaves the output layer out)."""
    names = resolve_targets(shape.linear_names, target, shape.output_layer)
    if names == "all-linear":
        return [lin for lin in shape.linears if lin[0].rsplit(".", 1)[-1] != shape.output_layer.rsplit(".", 1)[-1]]
    return [lin for lin in shape.linears if lin[0].rsplit(".", 1)[-1] in names]


def lora_parameters(shape: ModelShape, target: str | list[str], r: int) -> int:
    """Trainable parameters of a LoRA adapter: r x (in + out) per targeted matrix."""
    return sum(r * (i + o) for _, i, o in targeted(shape, target))

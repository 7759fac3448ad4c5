"""Tiny random causal LMs, one per family, built from config only (no hub access).

Every model: 2 layers, hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocabulary 512, float32.
Weights are re-drawn so activations are O(1) and the LM head gives logits of std ~8, so that
logit caps/scales (Gemma 2 softcap 4.0, Cohere logit_scale, Granite logits_scaling 4.0) change
the loss by a lot rather than by rounding.

    build(name) -> model (eval mode, seeded)
    FAMILIES[name] = (config class, model class, family-specific config kwargs)
"""
from __future__ import annotations

import math

import torch
import transformers

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2)

# name -> (config class, model class, kwargs on top of COMMON)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),  # SmolLM2-style
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(final_logit_softcapping=4.0, attn_logit_softcapping=50.0, sliding_window=8,
                    query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # real Gemma 3 checkpoints: softcapping None
               dict(sliding_window=8, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])),
    "gemma3_softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       dict(final_logit_softcapping=4.0, sliding_window=8, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.0625)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM",
                dict(logit_scale=0.25, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(logits_scaling=4.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                     attention_multiplier=0.0625)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layer_interval=2)),
    # cheap extras
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.25)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, **MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1, **MOE)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(num_local_experts=4, logits_scaling=4.0, embedding_multiplier=12.0, **MOE)),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM",
                   dict(final_logit_softcapping=4.0, sliding_window=8, query_pre_attn_scalar=16)),
}

# families that carry state along the row (LFM2's short convolutions look 2 tokens back, across
# a packed sequence's start): packing must be refused for them (tests/test_packing.py)
ROW_STATE: dict[str, tuple[str, str, dict]] = {
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])),
}

# families whose *ForCausalLM.forward changes the logits after the head (so tunejob's fast path,
# decoder + head only, gets the loss wrong)
TRANSFORMED = {"gemma2", "gemma3_softcap", "cohere", "cohere2", "granite", "granitemoe", "vaultgemma"}


def config_for(name: str):
    cfg_cls, _, extra = {**FAMILIES, **ROW_STATE}[name]
    return getattr(transformers, cfg_cls)(**{**COMMON, **extra})


@torch.no_grad()
def build(name: str, seed: int = 0, logit_std: float = 8.0):
    _, model_cls, _ = {**FAMILIES, **ROW_STATE}[name]
    torch.manual_seed(seed)
    cfg = config_for(name)
    cfg._attn_implementation = "eager" if name.startswith(("gemma2", "gemma3", "vaultgemma")) else "sdpa"
    model = getattr(transformers, model_cls)(cfg).float()
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in model.named_parameters():
        if p.dim() >= 2:  # matrices: unit-variance outputs for unit-variance inputs
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        else:  # norms / biases: small random offsets so nothing is trivially 1 or 0
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    head = model.get_output_embeddings()
    # the RMS-normed hidden state has norm ~sqrt(hidden): scale the head so logits have std ~logit_std
    head.weight.mul_(logit_std)
    if getattr(head, "bias", None) is not None:
        head.bias.zero_()
    model.eval()
    return model


def batch(seed: int = 0, rows: int = 2, length: int = 20, pad_row1: int = 5, device="cpu"):
    """Right-padded batch like tunejob's collator: labels -100 on the prompt and on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    if rows > 1 and pad_row1:
        ids[1, -pad_row1:] = 0
        attn[1, -pad_row1:] = 0
        labels[1, -pad_row1:] = -100
    labels[0, 10:12] = -100  # a user turn in the middle
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}

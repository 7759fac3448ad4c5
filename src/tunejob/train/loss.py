"""Training loss = the model's own forward, for every causal-LM family, with the LM head run only
where a label is trained.

Running the decoder (`base.model`) and the head (`get_output_embeddings()`) by hand skips whatever
`*ForCausalLM.forward` does between the two and the loss: Gemma 2 / 3 / VaultGemma
`final_logit_softcapping`, Cohere / Cohere2 `logit_scale`, Granite / GraniteMoe `logits_scaling`.
On a 2-layer Gemma 2 that made the loss 3x the model's own; tests/test_family_matrix.py checks
loss and LoRA gradients against `model(labels=...)` for 23 tiny models of 21 families.

Paths, best first (`choose_path` picks one per model, `forward_loss` runs it):

  "keep"       model(input_ids, attention_mask, logits_to_keep=<bool (B, T) mask>): the family's
               own forward, head + logit transform included, at the trained positions only.
               transformers 5.x `slice_logits_to_keep` takes a boolean (batch, seq) mask and
               returns (n_true, vocab) logits. Same FLOPs as the old fast path.
  "transform"  decoder + head at the trained positions + the family's transform re-implemented
               here (TRANSFORMS, keyed by class name): for a registered class whose forward does not
               take a boolean logits_to_keep.
  "fast"       decoder + head at the trained positions (the old path): only where nothing sits
               between the head and the loss.
  "full"       model(input_ids, attention_mask) -> all logits, then select: always right,
               costs the head and a (B, T, vocab) float tensor at every position.

Every candidate except "full" is checked once against the unsliced forward (`model(...).logits`)
on a small slice of a real batch, in eval mode and without autocast unless the weights are bf16 (no
RNG drawn, so resumed runs replay identically); the first that agrees within `tolerance` wins, else "full".
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from tunejob.train import distributed
from tunejob.train.batches import autocast, forward_batches

IGNORE = -100
PATHS = ("keep", "transform", "fast", "full")


# ------------------------------------------------------------ known logit transforms
# What *ForCausalLM.forward does between `self.lm_head(hidden_states)` and the loss in
# transformers 5.23 (found by scanning every *ForCausalLM.forward of the installed package).
# Each entry: (pre, post) where pre(base, hidden) runs before the head and post(base, logits) after.


def _softcap(cap_of):
    def post(base, logits):
        cap = cap_of(base)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap
    return post


_final_softcap = _softcap(lambda b: getattr(b.config, "final_logit_softcapping", None))
_cohere = lambda b, z: z * b.logit_scale  # noqa: E731  CohereForCausalLM.__init__: self.logit_scale = config.logit_scale
_granite = lambda b, z: z / b.config.logits_scaling  # noqa: E731

TRANSFORMS: dict[str, tuple] = {
    **{c: (None, _final_softcap) for c in (
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma4ForCausalLM",
        "Gemma4UnifiedForCausalLM", "VaultGemmaForCausalLM", "NanoChatForCausalLM")},
    **{c: (None, _cohere) for c in (
        "CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM")},
    **{c: (None, _granite) for c in (
        "GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
        "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM")},
    "HyperCLOVAXForCausalLM": (None, lambda b, z: z * b.config.logits_scaling),
    "FalconH1ForCausalLM": (None, lambda b, z: z * b.model.lm_head_multiplier),
    "RecurrentGemmaForCausalLM": (None, _softcap(lambda b: b.config.logits_soft_cap)),
    "MiniCPM3ForCausalLM": (lambda b, h: h / b.config.logits_scaling, None),
}


# ------------------------------------------------------------ helpers


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trained_mask(batch) -> torch.Tensor:
    """(B, T-1) bool: positions whose next-token label is trained."""
    return batch["labels"][:, 1:] != IGNORE


def _logits(model, batch, mask: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((mask.sum(), vocab) logits at positions mask (B, T-1), the MoE router aux loss or None), by `path`.
    The aux loss exists only on the model-forward paths ("keep", "full") of an MoE model whose
    config has output_router_logits=True; HF then adds router_aux_loss_coef * aux_loss to .loss."""
    if path not in PATHS:
        raise ValueError(f"unknown loss path {path!r}; one of {PATHS}")
    ids, attn = batch["input_ids"], batch.get("attention_mask")
    # a packed row (batches.packed_batch) carries position_ids restarting per sequence; without a
    # KV cache (use_cache=False) transformers then masks each sequence from the others
    pos = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    if path == "keep":
        keep = F.pad(mask, (0, 1), value=False)  # (B, T): the last position predicts nothing
        out = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep, use_cache=False, **pos)
        if out.logits.dim() != 2 or out.logits.shape[0] != int(mask.sum()):
            raise ValueError(f"logits_to_keep=<bool mask> gave logits of shape {tuple(out.logits.shape)}")
        return out.logits, getattr(out, "aux_loss", None)
    if path == "full":
        out = model(input_ids=ids, attention_mask=attn, use_cache=False, **pos)
        return out.logits[:, :-1][mask], getattr(out, "aux_loss", None)
    base = base_of(model)
    decoder, head = getattr(base, "model", None), base.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(base).__name__}: no .model decoder / output embeddings")
    pre, post = TRANSFORMS.get(type(base).__name__, (None, None)) if path == "transform" else (None, None)
    if path == "transform" and pre is None and post is None:
        raise ValueError(f"{type(base).__name__}: no known logit transform")
    hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False, **pos).last_hidden_state[:, :-1][mask]
    if pre is not None:
        hidden = pre(base, hidden)
    logits = head(hidden)
    if post is not None:
        logits = post(base, logits)
    return logits, None


def forward_loss(model, batch: dict, path: str = "keep", aux_loss: bool = True) -> tuple[torch.Tensor, int, int]:
    """(sum of token losses, trained tokens, correctly predicted trained tokens) of a micro-batch,
    by the path choose_path picked.

    With aux_loss and an MoE model that returns a router aux loss (config.output_router_logits),
    router_aux_loss_coef * aux_loss * tokens is added, so sum / tokens == the model's own .loss."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logits, aux = _logits(model, batch, mask, path)
    targets = labels[mask]
    logits = logits.float()  # one fp32 copy for the loss and the argmax (bf16's CPU argmax: 2.4x fp32's)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    if aux_loss and aux is not None:
        coef = getattr(base_of(model), "router_aux_loss_coef", None) or getattr(base_of(model).config, "router_aux_loss_coef", 0.0)
        loss = loss + coef * aux.to(loss.device).float() * int(mask.sum())
    with torch.no_grad():
        correct = int((logits.argmax(-1) == targets).sum())
    return loss, int(mask.sum()), correct


def sequence_logps(model, batch: dict, path: str = "keep") -> tuple[torch.Tensor, int, int]:
    """((B,) summed log-probabilities of each sequence's trained tokens, trained tokens, correctly
    predicted ones), by the same forward as the loss: the log-probability of a completion that DPO
    compares (TRL sums them the same way: `per_token_logps.sum(dim=1)` over the completion mask)."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logits, _ = _logits(model, batch, mask, path)
    targets = labels[mask]
    logits = logits.float()  # one fp32 copy for the log-probabilities and the argmax (as forward_loss)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    rows = mask.nonzero(as_tuple=True)[0]
    logps = torch.zeros(labels.shape[0], device=token_logps.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    with torch.no_grad():
        correct = int((logits.argmax(-1) == targets).sum())
    return logps, int(mask.sum()), correct


def token_logps(model, batch: dict, path: str = "keep", temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,) log-probabilities of each trained token in row-major order, (N,) their rows), by the
    loss's forward. Logits are divided by the sampling temperature first, as TRL's GRPOTrainer does,
    so the probabilities are those the answers were sampled from."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logits, _ = _logits(model, batch, mask, path)
    logps = -F.cross_entropy(logits.float() / temperature, labels[mask], reduction="none")
    return logps, mask.nonzero(as_tuple=True)[0]


# ------------------------------------------------------------ choosing the path


@dataclasses.dataclass
class Choice:
    path: str
    tried: dict  # path -> max relative per-token difference to the model's own forward, or the error

    def __str__(self):
        return f"{self.path} ({', '.join(f'{k}: {v}' for k, v in self.tried.items())})"


def _check_batch(batch: dict, max_tokens: int) -> dict:
    """One sequence, at most max_tokens, no padding: bounds the (T, vocab) float logits of the
    unsliced reference forward (128 x 262k x 4 B = 134 MB for Gemma)."""
    ids = batch["input_ids"][:1]
    attn = batch.get("attention_mask")
    n = int(attn[0].sum()) if attn is not None else ids.shape[1]  # right padding
    n = max(2, min(n, max_tokens))
    ids = ids[:, :n]
    # every next token is a target: exercises the head at every real position, independent of labels
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def stored_bf16(model) -> bool:
    """Whether the frozen base is stored in bf16 (mixed_precision bf16): such a model is always run
    under bf16 autocast, so training, its validation and `tunejob eval` do the same arithmetic."""
    return base_of(model).get_output_embeddings().weight.dtype == torch.bfloat16


def default_tolerance(model) -> float:
    dt = base_of(model).get_output_embeddings().weight.dtype
    return 1e-4 if dt in (torch.float32, torch.float64) else 1e-2


@torch.no_grad()
def choose_path(model, batch: dict, tolerance: float | None = None, max_tokens: int = 128,
                candidates: tuple[str, ...] = ("keep", "transform", "fast")) -> Choice:
    """The first candidate path whose per-token losses match the model's own unsliced forward on
    (a slice of) `batch` within `tolerance` (max |difference| / mean loss), else "full"."""
    tol = default_tolerance(model) if tolerance is None else tolerance
    b = _check_batch(batch, max_tokens)
    mask = _trained_mask(b)
    targets = b["labels"][:, 1:][mask]
    was_training = model.training
    model.eval()  # no dropout: both forwards see the same function and no RNG is drawn
    tried = {}
    try:
        # fp32 weights: no autocast, the exact reference. bf16 weights (mixed_precision bf16) cannot
        # run without it (fp32 LoRA outputs meet bf16 layers), and default_tolerance is bf16's then.
        with torch.autocast(device_type=b["input_ids"].device.type, dtype=torch.bfloat16, enabled=stored_bf16(model)):
            ref = F.cross_entropy(_logits(model, b, mask, "full")[0].float(), targets, reduction="none")
            scale = ref.abs().mean().clamp_min(1e-6)
            for path in candidates:
                try:
                    got = F.cross_entropy(_logits(model, b, mask, path)[0].float(), targets, reduction="none")
                except Exception as e:  # unsupported by this family: try the next
                    tried[path] = f"{type(e).__name__}: {str(e)[:80]}"
                    continue
                rel = float((got - ref).abs().max() / scale)
                tried[path] = f"{rel:.1e}"
                if rel <= tol:
                    return Choice(path, tried)
    finally:
        model.train(was_training)
    return Choice("full", tried)


class LossPath:
    """Per-model state for the trainer: decides the path on the first batch it sees, says which in
    one line (`say`), then reuses it.

        loss_path = LossPath(say=print)
        loss, n, correct = loss_path(model, batch)
    """

    def __init__(self, tolerance: float | None = None, path: str | None = None, say=None):
        self.tolerance, self.say = tolerance, say
        self.choice = Choice(path, {"forced": path}) if path else None

    def __call__(self, model, batch: dict):
        return forward_loss(model, batch, self.path_for(model, batch))

    def path_for(self, model, batch: dict) -> str:
        if self.choice is None:
            self.choice = choose_path(model, batch, self.tolerance)
            if self.say is not None:
                self.say(describe(model, self.choice))
        return self.choice.path


def describe(model, choice: Choice) -> str:
    name = type(base_of(model)).__name__
    if choice.path == "full":
        return (f"note: {name}: no head-only loss path matched the model's own forward ({choice.tried}); "
                "computing full logits at every position (slower, same loss)")
    return f"loss: {name}'s own forward, LM head at trained positions only (path {choice.path}, checked on the first batch)"


def evaluate(model, sequences, collate, micro_batch: int, device, world: distributed.World | None = None,
             bf16: bool = False, loss_path: LossPath | None = None, pack_tokens: int = 0) -> tuple[float, float]:
    """(token-mean loss, token accuracy) over the whole split; with several processes each rank
    takes every world.size-th example and the sums are all-reduced, so every rank gets the total.
    pack_tokens > 0 (a model train.packing checked): short sequences share a forward pass."""
    world = world or distributed.World(device=device)
    loss_path = loss_path or LossPath()
    was_training = model.training  # restored on the way out: callers need not know eval() ran
    model.eval()
    total_loss, total_tokens, total_correct = 0.0, 0, 0
    mine = sequences[world.rank :: world.size]
    try:
        with torch.no_grad(), autocast(device, bf16 or stored_bf16(model)):
            for batch in forward_batches(collate, mine, micro_batch, device, pack_tokens):
                loss, tokens, correct = loss_path(model, batch)
                total_loss += loss.item()
                total_tokens += tokens
                total_correct += correct
    finally:
        model.train(was_training)
    total_loss, total_tokens, total_correct = distributed.sum_(world, [total_loss, total_tokens, total_correct])
    return total_loss / max(total_tokens, 1), total_correct / max(total_tokens, 1)

"""Will it fit? Memory and time of a local LoRA / QLoRA job, from the model's real shapes.

Pure arithmetic over a ModelShape. The parts, in bytes:
- weights: frozen base at 4 bytes (fp32), 2 (bf16) or, for 4-bit NF4 with double quantization,
  0.5 + 0.127/8 per weight of the quantized linears (a 4-bit code, plus an 8-bit absmax per 64
  weights and an fp32 scale per 256 of those); embeddings and norms stay in the compute dtype.
  A 7B model: 28 GB in fp32, 14 GB in bf16, about 3.9 GB in NF4 ("fits a single 8 GB GPU").
- adapter: the LoRA parameters, their gradients and AdamW's two moments, all fp32: 16 bytes each.
- activations kept for backward, per token and layer: the norms' inputs and outputs (4h), q, k,
  v after rotary and grouped-query expansion (h + 2 h_kv, and h for the scaled q), the attention
  output (h), the MLP's gate, up, activation and product (4 i), and for each LoRA-wrapped layer
  3x its input (dropout output, mask, the adapter's saved input: measured, see below). The
  attention kernels in use (SDPA; flash on CUDA and CPU) keep no heads x seq matrix.
  Gradient checkpointing keeps only each layer's input (h).
- the LM head's logits at trained positions, with their log-softmax and gradient (3 x vocab each).
- runtime: CUDA context, or on CPU the process with its libraries and autograd workspace.
- CPU allocator slack: RSS over a run settles ~19% above a single step's peak (glibc keeps freed
  blocks of varying sizes).

Calibrated on 2026-11-29 against measured RSS of forward+backward on SmolLM2-135M (2 CPU cores):
4x384 tokens all-linear 5.85 GB (model: 5.7), 2x384 3.17 (3.1), 4x192 3.15 (3.1), 4x384
q_proj+v_proj 3.59 (3.57); the whole demo run peaked at 7.42 GB. The first version of this
formula (2x LoRA inputs, no norm outputs) said 4.66 GB for that run: 37% low.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunejob.train.shapes import ModelShape, lora_parameters, targeted

NF4_BYTES_PER_WEIGHT = 0.5 + 0.127 / 8
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
RUNTIME_BYTES = {"cpu": 0.9 * 2**30, "cuda": 0.5 * 2**30}  # CPU: ~0.45 GB process + ~0.45 GB workspace (measured)
CPU_ALLOCATOR_SLACK = 1.19
LORA_INPUT_COPIES = 3
GIB = 2**30


@dataclass
class MemoryEstimate:
    weights_gb: float
    adapter_gb: float
    activations_gb: float
    logits_gb: float
    runtime_gb: float
    total_gb: float
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    fits: bool | None = None
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_memory(
    shape: ModelShape,
    *,
    r: int,
    target: str | list[str],
    quantization: str = "none",
    dtype: str = "fp32",
    micro_batch: int,
    seq_len: int,
    trained_fraction: float = 0.6,
    lora_dropout: float = 0.05,
    gradient_checkpointing: bool = False,
    device: str = "cpu",
    gpu_memory_gb: float | None = None,
) -> MemoryEstimate:
    bytes_per = DTYPE_BYTES[dtype]
    lin_weights = sum(i * o for n, i, o in shape.linears if n.rsplit(".", 1)[-1] != shape.output_layer.rsplit(".", 1)[-1])
    other = shape.total_params - lin_weights  # embeddings, (untied) head, norms
    if quantization == "4bit":
        weights = lin_weights * NF4_BYTES_PER_WEIGHT + other * bytes_per
    else:
        weights = shape.total_params * bytes_per
    trainable = lora_parameters(shape, target, r)
    adapter = trainable * 16
    tokens = micro_batch * seq_len
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden * shape.kv_heads // max(shape.heads, 1)
    lora_inputs = sum(in_f for _, in_f, _ in targeted(shape, target)) // max(shape.layers, 1)
    copies = LORA_INPUT_COPIES if lora_dropout > 0 else LORA_INPUT_COPIES - 1
    per_token_layer = 4 * h + (h + 2 * kv) + h + h + 4 * i + copies * lora_inputs
    act_bytes = 4 if dtype == "fp32" else 2
    if gradient_checkpointing:
        activations = tokens * (shape.layers * h + per_token_layer) * act_bytes
    else:
        activations = tokens * shape.layers * per_token_layer * act_bytes
    logits = tokens * trained_fraction * shape.vocab * 4 * 3
    if device != "cuda":
        activations, logits = activations * CPU_ALLOCATOR_SLACK, logits * CPU_ALLOCATOR_SLACK
    runtime = RUNTIME_BYTES["cuda" if device == "cuda" else "cpu"]
    total = weights + adapter + activations + logits + runtime
    est = MemoryEstimate(
        weights_gb=round(weights / GIB, 3), adapter_gb=round(adapter / GIB, 4), activations_gb=round(activations / GIB, 3),
        logits_gb=round(logits / GIB, 3), runtime_gb=round(runtime / GIB, 2), total_gb=round(total / GIB, 2),
        # the total counts the adapter too, as `tunejob run` reports it (base 134,515,008 + LoRA = 139,399,488)
        trainable_parameters=trainable, total_parameters=shape.total_params + trainable,
        trainable_percent=round(100 * trainable / max(shape.total_params + trainable, 1), 3),
    )
    if gpu_memory_gb is not None:
        est.fits = total / GIB <= gpu_memory_gb
        if not est.fits:
            est.advice = advice_to_fit(shape, total / GIB, gpu_memory_gb, weights / GIB, activations / GIB, quantization, micro_batch, gradient_checkpointing)
    return est


def advice_to_fit(shape: ModelShape, total: float, budget: float, weights: float, activations: float, quantization: str, micro_batch: int, checkpointing: bool) -> list[str]:
    """What to change, biggest saving first, each with its figure."""
    tips = []
    if quantization != "4bit":
        nf4 = weights * NF4_BYTES_PER_WEIGHT / 4
        tips.append(f"quantization: 4bit (QLoRA) cuts the weights from {weights:.1f} GB to about {nf4:.1f} GB")
    if not checkpointing and activations > 0.1:
        kept = activations / max(shape.layers, 1) * 2
        tips.append(f"gradient checkpointing cuts activations from {activations:.1f} GB to about {kept:.1f} GB (~30% slower)")
    if micro_batch > 1:
        tips.append(f"a micro-batch of 1 with gradient_accumulation {micro_batch} keeps the effective batch and divides activations by {micro_batch}")
    tips.append(f"or lower max_seq_len; the job needs {total:.1f} GB of {budget:.1f} GB")
    return tips


def training_flops_per_token(shape: ModelShape, trained_fraction: float = 0.6) -> float:
    """LoRA: forward (2N) + backward through frozen weights (2N): 4 FLOPs per weight and token,
    plus the LM head (2 x h x vocab forward, x3 with backward) at trained positions only."""
    head = shape.hidden * shape.vocab
    body = sum(i * o for _, i, o in shape.linears) - (head if shape.output_layer else 0)
    return 4 * body + 6 * head * trained_fraction


def estimate_seconds(shape: ModelShape, tokens: int, peak_flops: float, efficiency: float) -> float:
    return tokens * training_flops_per_token(shape) / (peak_flops * efficiency)


def measure_cpu_peak_flops(dtype: str = "fp32") -> float:
    """This machine's matrix-multiply rate (FLOP/s), for time estimates on CPU: the one probe that
    `mixed_precision: auto` reads too (train/precision.py), measured once per machine."""
    from tunejob.train.precision import cached_cpu_probe

    return cached_cpu_probe()[f"{dtype}_gflops"] * 1e9

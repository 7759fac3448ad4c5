"""The trainable model: the base loaded (fp32, or NF4 for QLoRA) and the LoRA adapter on it."""

from __future__ import annotations

import torch

from tunejob.errors import ModelError
from tunejob.spec import JobSpec
from tunejob.train.shapes import resolve_targets, shape_of


def disable_bnb_avx512bf16(model) -> int:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks Linear4bit weights during an eval or
    generate() pass, after which every LoRA gradient is 0. Turning the path off avoids it."""
    n = 0
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_model(spec: JobSpec, model_path: str, device: torch.device, precision: str = "no"):
    return load_base(model_path, spec.quantization, device, torch.bfloat16 if precision == "bf16" else torch.float32)


def load_base(model_path: str, quantization: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The frozen base as training sees it: fp32 or bf16 (cast once here, so autocast has nothing
    to re-cast at every step), or NF4 with double quantization for QLoRA (an adapter trained on the
    4-bit base answers on the 4-bit base, not on weights it never saw)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype}
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_path}: cannot load the model ({exc})") from None
    if quantization == "4bit":
        disable_bnb_avx512bf16(model)
    else:
        model.to(device)
    return model


def add_lora(spec: JobSpec, model):
    from tunejob.train.dropout import use_mask_dropout
    from tunejob.train.loss import stored_bf16
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.lora import LoraLayer

    if spec.quantization == "4bit":
        # Gradient checkpointing trades ~30% speed for activation memory; off unless memory needs it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    base_in_bf16 = stored_bf16(model)
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.resolved_alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=resolve_targets(shape_of(model).linear_names, spec.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    use_mask_dropout(model)  # the same dropout, its mask drawn 4 elements a draw (train/dropout.py)
    if base_in_bf16:  # run only under bf16 autocast (loss.stored_bf16), which casts each adapted layer's
        # input to bf16 for the fp32 adapter anyway: peft's own cast up to fp32 first is two copies for
        # the same values (bit-identical gradients; a demo-shaped step 1.10x faster, bench/RESULTS.md)
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.cast_input_dtype_enabled = False
    if spec.quantization == "4bit":
        disable_bnb_avx512bf16(model)
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

"""A fine-tuned run's model, loaded the way its training evaluated it: the precision the run
trained in (its summary), the matching base (fp32, bf16 storage, or 4-bit), the adapter on top,
and autocast while it is used. `tunejob eval` and the demo both answer through this, so they report
the same fact score and loss as training did."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


def trained_precision(run_dir: Path) -> str:
    """'bf16' or 'no': what the run trained (and validated) in, from its summary; 'no' for runs
    from before mixed_precision was recorded or still running."""
    import json

    try:
        return json.loads((Path(run_dir) / "summary.json").read_text()).get("mixed_precision") or "no"
    except (OSError, ValueError):
        return "no"


def load_tuned(spec, checkpoint: Path, device, precision: str = "no"):
    """(PEFT model, tokenizer), loaded the way training evaluated it, so the losses agree: fp32,
    the base stored in bf16 for a bf16 run (used under autocast), or the 4-bit base for a QLoRA run
    (a fp32 base would shift the loss by the quantisation error)."""
    from tunejob.evaluate.chat import load_for_chat

    if spec.quantization != "4bit" and precision != "bf16":
        model, tokenizer = load_for_chat(checkpoint)
        return model.to(device), tokenizer
    from peft import PeftModel

    from tunejob.evaluate.chat import base_model_of, tokenizer_of
    from tunejob.train.adapter import disable_bnb_avx512bf16, load_model

    base_path = base_model_of(checkpoint)
    model = PeftModel.from_pretrained(load_model(spec, base_path, device, precision), str(checkpoint))
    disable_bnb_avx512bf16(model)
    model.eval()
    return model, tokenizer_of(checkpoint, base_path)


@contextmanager
def loaded_as_trained(spec, run_dir: Path, checkpoint: Path, device):
    """(model, tokenizer, precision), used under the arithmetic training validated with."""
    from tunejob.train.batches import autocast

    precision = trained_precision(run_dir)
    model, tokenizer = load_tuned(spec, checkpoint, device, precision)
    with autocast(device, precision == "bf16"):
        yield model, tokenizer, precision

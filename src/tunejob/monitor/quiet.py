"""Library noise kept off tunejob's terminal output, unless --verbose (TUNEJOB_VERBOSE=1).

A first run printed, before tunejob's first line: bitsandbytes' "Failed to load CPU
gemm_4bit_forward from kernels-community ... pip install kernels" (on every run, 4-bit or not),
transformers' FutureWarning about `is_gradient_checkpointing` (raised inside peft), and
"Loading weights" / "Writing model shards" progress bars. None of them is the user's to act on.
`quiet()` silences exactly those around tunejob's own calls and restores the previous settings
afterwards, so a user's own code keeps its warnings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

KNOWN_WARNINGS = (r".*`is_gradient_checkpointing` is deprecated.*",)
NOISY_LOGGERS = ("bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub")


def verbose() -> bool:
    return os.environ.get("TUNEJOB_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def quiet():
    if verbose():
        yield
        return
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    bars = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    try:
        from transformers.utils import logging as hf_logging  # torch-free import; absent without the train extra

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except ImportError:
        hf_logging, bars_were_on = None, False
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        with warnings.catch_warnings():
            for pattern in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if hf_logging is not None and bars_were_on:
            hf_logging.enable_progress_bar()
        if bars is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = bars

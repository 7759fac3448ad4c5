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
import sys
import warnings

KNOWN_WARNINGS = (r".*`is_gradient_checkpointing` is deprecated.*",)
NOISY_LOGGERS = ("bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub")


def verbose() -> bool:
    return os.environ.get("TUNEJOB_VERBOSE", "") not in ("", "0")


ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}  # read when transformers is imported


@contextlib.contextmanager
def quiet():
    """Never imports transformers itself (1 s of `tunejob --help`): environment variables cover an
    import that happens inside, the library's own switches one that already happened."""
    if verbose():
        yield
        return
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    saved_env = {name: os.environ.get(name) for name in ENV}
    hf_logging = sys.modules.get("transformers.utils.logging")
    # A transformers imported inside keeps its bars off (huggingface_hub reads the variable once, at
    # import); one imported before gets them back on the way out.
    bars_were_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if hf_logging is not None:
        hf_logging.disable_progress_bar()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.update(ENV)
    try:
        with warnings.catch_warnings():
            for pattern in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in saved_env.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        if bars_were_on:
            hf_logging.enable_progress_bar()

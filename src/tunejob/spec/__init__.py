"""The job spec (foundation: every stage may import it; it imports only `errors`).

`job.py` holds the typed sections and their cross-field checks, `loader.py` the YAML reading,
overrides and error lines. Import from here: `from tunejob.spec import JobSpec, load_spec`.
"""

from tunejob.spec.job import (
    LOCAL_AUTO_BATCH_SIZE,
    LOCAL_AUTO_EPOCHS,
    LORA_DEFAULT_LR,
    OPENAI_AUTO_BATCH_SIZE,
    BedrockSettings,
    Checkpointing,
    DataSpec,
    DistributedSettings,
    Hyperparameters,
    JobSpec,
    LoraSpec,
    MethodSpec,
    OpenAISettings,
)
from tunejob.spec.loader import format_validation_error, load_spec, parse_spec

__all__ = [
    "LOCAL_AUTO_BATCH_SIZE", "LOCAL_AUTO_EPOCHS", "LORA_DEFAULT_LR", "OPENAI_AUTO_BATCH_SIZE", "BedrockSettings", "Checkpointing", "DataSpec",
    "DistributedSettings", "Hyperparameters", "JobSpec", "LoraSpec", "MethodSpec", "OpenAISettings", "format_validation_error",
    "load_spec", "parse_spec",
]

"""The exceptions tunejob raises on purpose.

Every one of them is meant for a person: the message says what is wrong, where (file:line or
config key) and how to fix it. The CLI prints the message as it is and exits with code 2; it never
shows a traceback for these.
"""

from __future__ import annotations


class TunejobError(Exception):
    """Base class: anything tunejob reports to the user as a clear error."""

    exit_code = 2


class SpecError(TunejobError):
    """The job spec (YAML or --set overrides) is invalid; the message lists every problem."""


class DataError(TunejobError):
    """A dataset file cannot be read, or fails validation."""


class ModelError(TunejobError):
    """A base model cannot be found or loaded, or a LoRA target matches nothing."""


class PriceError(TunejobError):
    """No price is known for a model, or a cost input is out of range."""


class BackendError(TunejobError):
    """A training backend (local, OpenAI, Bedrock) failed in a way the user can act on."""


class Stopped(TunejobError):
    """Training stopped on request (SIGTERM: serve's pause or cancel, a scheduler's preemption)
    after saving a checkpoint of the last finished step; running the job again resumes it."""

    exit_code = 143  # 128 + SIGTERM, the shell's code for a process ended by SIGTERM

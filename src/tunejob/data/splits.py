"""The examples a job trains and validates on: its files validated, then split as the spec says."""

from __future__ import annotations

from tunejob.data.dataset import load_examples, split_examples
from tunejob.spec import JobSpec


def load_splits(spec: JobSpec) -> tuple[list[dict], list[dict]]:
    """Validated train and validation examples (validation split off train when not given)."""
    from tunejob.data.validate import require_valid

    whole = spec.method.type == "reinforcement"  # the grader reads each line's other fields as item.*
    for path in filter(None, [spec.data.train, spec.data.validation]):
        require_valid(path, min_examples=1 if path == spec.data.validation else 2, method=spec.method.type, grader=spec.method.grader)
    train = load_examples(spec.data.train, whole_lines=whole)
    if spec.data.validation is not None:
        return train, load_examples(spec.data.validation, whole_lines=whole)
    return split_examples(train, spec.data.val_fraction, spec.data.seed)

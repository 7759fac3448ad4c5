"""Old model names kept working: `--alias 'ft:gpt-4o-mini-2024-07-18:acme::AbC123=RUN_DIR'`.

After `tunejob migrate`, client code keeps the `ft:` id it has always sent and changes only
base_url and the key: the alias makes that id answer with the retrained run's best adapter. The
path may be a run directory, a checkpoint, or a migration folder (its `retrained/` run; with no
`NAME=`, the name is the model the folder recorded). Aliases are this server's, so every key it
accepts may chat with them (a server run for the organisation that owned the model); a key's own
fine-tuned models of the same name come first.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunejob.errors import TunejobError


def _target(path: Path) -> Path:
    if (path / "migration.json").is_file():
        return path / "retrained"
    return path


def parse_aliases(items: list[str]) -> dict[str, str]:
    """{old model name: run directory or checkpoint}; every path checked now, one line if wrong."""
    from tunejob.evaluate.chat import run_checkpoint

    out: dict[str, str] = {}
    for item in items:
        name, sep, raw = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(raw).expanduser()
        if not sep:
            try:
                name = json.loads((path / "migration.json").read_text())["source"]["model"]
            except (OSError, ValueError, KeyError):
                raise TunejobError(f"--alias {item!r}: write it as OLD_MODEL_NAME=RUN_DIR, or give a migration folder "
                                   "(`tunejob migrate record` wrote migration.json there)") from None
        target = _target(path)
        try:
            run_checkpoint(target)
        except TunejobError as exc:
            raise TunejobError(f"--alias {item!r}: {exc} (train it first: tunejob migrate retrain DIR --model BASE --run)") from None
        out[name] = str(target)
    return out


def alias_chat_model(aliases: dict[str, str], name: str) -> tuple[str, Path] | None:
    """(base model path, adapter checkpoint) for an aliased name, else None. The run's `best` is
    resolved per request, so an alias follows a run that is trained further."""
    from tunejob.evaluate.chat import base_model_of, run_checkpoint

    target = aliases.get(name)
    if target is None:
        return None
    checkpoint = run_checkpoint(target)
    return base_model_of(checkpoint), checkpoint

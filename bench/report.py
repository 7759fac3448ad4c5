"""Where a benchmark's figures go: printed, and written to --out (the file RESULTS.md cites)."""

from __future__ import annotations

import json
from pathlib import Path


def publish(figures: dict | str, out: Path | None) -> None:
    """Print the figures (a dict as indented JSON, or text) and write the same to `out` if given."""
    text = figures if isinstance(figures, str) else json.dumps(figures, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")

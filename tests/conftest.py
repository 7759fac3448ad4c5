"""Shared fixtures. All state goes to temp dirs; the converted embedded tokenizer is cached once
under .cache/ in the repo (it is a read-only artefact, ~11 s to extract)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TUNEJOB_CACHE", str(REPO / ".cache" / "tunejob"))

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def write_chat_data(path: Path, n: int, seed: int = 0, system: str = "Echo in capitals.") -> Path:
    """n distinct echo examples: the answer is the question in capitals, learnable by a tiny model."""
    rng = random.Random(seed)
    seen: set[str] = set()
    with open(path, "w") as f:
        while len(seen) < n:
            q = " ".join(rng.choice(WORDS) for _ in range(5))
            if q in seen:
                continue
            seen.add(q)
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}, {"role": "assistant", "content": q.upper()}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tunejob.train.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def long_context_model(tmp_path_factory) -> Path:
    """The tiny model with SmolLM2-135M's 8,192-token context, for tests that need a generation of
    4,000 tokens: past tiny_model's 2,048 the server answers OpenAI's 400 context_length_exceeded."""
    from tunejob.train.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("long-context-model"), context=8192)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "tunejob", *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)

"""What graders need from outside the grader object: where model graders and embeddings are
called, and the python grader's limits. Everything is optional; the defaults grade string_check,
text_similarity (but cosine) and python graders with no network at all."""

from __future__ import annotations

import os
from dataclasses import dataclass

# OpenAI's graders guide names the embedding model behind text_similarity's cosine.
DEFAULT_EMBEDDINGS_MODEL = "text-embedding-3-large"


@dataclass
class GraderContext:
    # score_model / label_model: an OpenAI-compatible endpoint (tunejob serve included). None: the
    # openai SDK's own defaults, $OPENAI_BASE_URL (else OpenAI) with $OPENAI_API_KEY.
    base_url: str | None = None
    api_key: str | None = None
    # text_similarity 'cosine' only; without it cosine is refused when the grader is checked.
    embeddings_base_url: str | None = None
    embeddings_model: str | None = None
    # A python grader's wall time per sample and its memory (address space). OpenAI allows 2 minutes
    # and 2 GB on its own servers; a training step waits for the slowest of 16-64 samples, so a
    # grader that needs more than 10 s here is more likely stuck than thorough.
    python_timeout_s: float = 10.0
    python_memory_mb: int = 512


def openai_client(base_url: str | None, api_key: str | None):
    """The openai SDK's client for a grader's model calls. With no base_url, the SDK's defaults
    ($OPENAI_BASE_URL, else OpenAI; $OPENAI_API_KEY). With one, a keyless local server gets a
    placeholder key rather than the SDK's "api_key must be set" error. Two retries with backoff on
    429 and 5xx, as the SDK does by default; 120 s per request, since a grader waits on it."""
    from openai import OpenAI

    if base_url and not api_key:
        api_key = os.environ.get("OPENAI_API_KEY") or "none"
    return OpenAI(base_url=base_url, api_key=api_key, max_retries=2, timeout=120)

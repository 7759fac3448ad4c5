"""Validation + token counting of a large chat JSONL file: tunejob vs the cookbook's loop.

    python bench/validate_throughput.py [--examples 100000] [--out bench/results/validate.json]

The baseline is OpenAI's data-preparation cookbook as people copy it: json.loads each line into a
list, then one Python loop of format checks and `num_tokens_from_messages` with one
`encoding.encode` call per value. Both sides use the same tiktoken encoding and produce the same
token totals (checked below), so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from report import publish

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "tunejob" / "resources" / "sales_companion.jsonl"


def make_file(path: Path, n: int, seed: int = 0) -> None:
    """n distinct examples built from the Sales Companion set (suffixes keep them unique)."""
    base = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            ex = json.loads(json.dumps(rng.choice(base)))
            ex["messages"][1]["content"] += f" (ref {i})"
            f.write(json.dumps(ex) + "\n")


def cookbook(path: Path, encoding) -> dict:
    """The cookbook's checks and counts, as published (per-example loop, encode per value)."""
    with open(path, "r", encoding="utf-8") as f:
        dataset = [json.loads(line) for line in f]
    format_errors = defaultdict(int)
    for ex in dataset:
        if not isinstance(ex, dict):
            format_errors["data_type"] += 1
            continue
        messages = ex.get("messages", None)
        if not messages:
            format_errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                format_errors["message_missing_key"] += 1
            if any(k not in ("role", "content", "name", "function_call", "weight") for k in message):
                format_errors["message_unrecognized_key"] += 1
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                format_errors["unrecognized_role"] += 1
            content = message.get("content", None)
            function_call = message.get("function_call", None)
            if (not content and not function_call) or not isinstance(content, str):
                format_errors["missing_content"] += 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            format_errors["example_missing_assistant_message"] += 1

    def num_tokens_from_messages(messages, tokens_per_message=3, tokens_per_name=1):
        num_tokens = 0
        for message in messages:
            num_tokens += tokens_per_message
            for key, value in message.items():
                num_tokens += len(encoding.encode(value))
                if key == "name":
                    num_tokens += tokens_per_name
        num_tokens += 3
        return num_tokens

    def num_assistant_tokens_from_messages(messages):
        return sum(len(encoding.encode(m["content"])) for m in messages if m["role"] == "assistant")

    totals = [num_tokens_from_messages(ex["messages"]) for ex in dataset]
    assistant = [num_assistant_tokens_from_messages(ex["messages"]) for ex in dataset]
    return {"examples": len(dataset), "tokens": sum(totals), "assistant_tokens": sum(assistant), "errors": sum(format_errors.values())}


def tunejob_side(path: Path, encoding) -> dict:
    from tunejob.data.tokens import TiktokenCounter
    from tunejob.data.validate import validate_file

    report = validate_file(path, counter=TiktokenCounter(encoding))
    return {"examples": report.examples, "tokens": report.stats["tokens_per_example"]["total"],
            "assistant_tokens": report.stats["assistant_tokens_per_example"]["total"], "errors": report.errors}


def measure(side: str, path: Path, enc_name: str) -> dict:
    """Run one side in a fresh process, so peak memory (ru_maxrss) is its own."""
    code = (
        "import json,sys,time,resource; sys.path.insert(0, %r)\n"
        "import validate_throughput as b\nfrom tunejob.data.tokens import load_encoding\n"
        "enc = load_encoding(%r); t = time.perf_counter(); r = getattr(b, %r)(b.Path(%r), enc)\n"
        "r['seconds'] = time.perf_counter() - t; r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps(r))\n"
    ) % (str(Path(__file__).parent), enc_name, side, str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from tunejob.data.tokens import load_encoding

    enc_name = "o200k_base" if load_encoding("o200k_base") else "cl100k_base"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.jsonl"
        make_file(path, args.examples)
        size_mb = path.stat().st_size / 2**20
        base = measure("cookbook", path, enc_name)
        ours = measure("tunejob_side", path, enc_name)
    assert base["tokens"] == ours["tokens"] and base["assistant_tokens"] == ours["assistant_tokens"], (base, ours)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "python": platform.python_version(), "encoding": enc_name, "examples": args.examples, "file_mb": round(size_mb, 1),
        "cookbook": {**base, "examples_per_s": round(base["examples"] / base["seconds"])},
        "tunejob": {**ours, "examples_per_s": round(ours["examples"] / ours["seconds"])},
    }
    result["speedup"] = round(result["tunejob"]["examples_per_s"] / result["cookbook"]["examples_per_s"], 2)
    publish(result, args.out)


if __name__ == "__main__":
    main()

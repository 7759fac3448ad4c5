"""Reading fine-tuning JSONL files safely, splitting them, and converting between formats.

Three input formats are accepted, as OpenAI documents them:
- chat: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ..., "weight": 0|1}, ...]}
- prompt/completion: {"prompt": "...", "completion": "..."}, read as one user and one assistant turn.
- preference (DPO): {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]},
  loaded as it is (data/preference.py reads it).

Reading never trusts the file: lines are read in bounded chunks (a 2 GB line costs 8 MiB of
memory, not 2 GB), bytes are decoded strictly, and a path that is missing, a directory or a
device is one clear DataError.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunejob.errors import DataError

# One example of OpenAI's largest context (65,536 tokens) is about 260 KB of text; 8 MiB leaves
# room for long tool outputs while keeping a pathological line from exhausting memory.
MAX_LINE_BYTES = 8 * 1024 * 1024
_SKIP_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class RawLine:
    """One physical line: its 1-based number and its bytes, or why it could not be taken."""

    number: int
    data: bytes | None  # None when the line was over the limit
    size: int  # bytes in the line, without the newline


def open_jsonl(path: str | Path):
    """Open a dataset file for binary reading, or raise a one-line DataError saying why not."""
    p = Path(path)
    try:
        if p.is_dir():
            raise DataError(f"{p}: is a directory; pass a .jsonl file")
        if p.exists() and not p.is_file():
            raise DataError(f"{p}: is not a regular file (device, pipe or socket); pass a .jsonl file")
        return p.open("rb")
    except FileNotFoundError:
        raise DataError(f"{p}: no such file; check the path") from None
    except PermissionError:
        raise DataError(f"{p}: permission denied; check the file's permissions") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot open ({exc.strerror or exc})") from None


def iter_raw_lines(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawLine]:
    """Yield every line of the file with its number; over-long lines come back with data=None."""
    with open_jsonl(path) as f:
        number = 0
        while True:
            try:
                chunk = f.readline(max_line_bytes + 1)
            except OSError as exc:
                raise DataError(f"{path}: read failed after line {number} ({exc.strerror or exc})") from None
            if not chunk:
                return
            number += 1
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                size = len(chunk)
                while not chunk.endswith(b"\n"):
                    chunk = f.readline(_SKIP_CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                yield RawLine(number, None, size - (1 if chunk.endswith(b"\n") else 0))
                continue
            data = chunk[:-1] if chunk.endswith(b"\n") else chunk
            if data.endswith(b"\r"):
                data = data[:-1]
            yield RawLine(number, data, len(data))


def text_of(content: object) -> str:
    """Message content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def as_messages(obj: dict) -> list[dict]:
    """The example as a chat message list (prompt/completion becomes user + assistant)."""
    if "messages" in obj:
        messages = list(obj["messages"])
        system = obj.get("system")  # Bedrock's format keeps the system prompt beside the messages
        if isinstance(system, str) and system and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages
    return [
        {"role": "user", "content": obj.get("prompt", "")},
        {"role": "assistant", "content": obj.get("completion", "")},
    ]


def load_examples(path: str | Path, whole_lines: bool = False) -> list[dict]:
    """Parse a dataset that has passed validation into chat examples ({"messages": [...]}); with
    `whole_lines`, each line as it is (reinforcement: its other fields are the grader's item)."""
    examples = []
    for raw in iter_raw_lines(path):
        if raw.data is None or not raw.data.strip():
            continue
        try:
            obj = json.loads(raw.data.decode("utf-8-sig" if raw.number == 1 else "utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}:{raw.number}: not valid JSON ({exc}); run `tunejob validate {path}`") from None
        if "preferred_output" in obj or whole_lines:  # a preference pair stays in OpenAI's shape (data/preference.py)
            examples.append(obj)
            continue
        example = {"messages": as_messages(obj)}
        # function calling: the tool list is rendered with the conversation (data/tool_calls.py)
        example.update({k: obj[k] for k in ("tools", "functions") if obj.get(k)})
        examples.append(example)
    return examples


def split_examples(examples: list, val_fraction: float = 0.1, seed: int = 42) -> tuple[list, list]:
    """Deterministic train/validation split: the same seed and input give the same split.

    At least one example goes to each side; 100 examples at 0.1 -> 90 / 10.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = len(examples)
    if n < 2:
        raise DataError(f"cannot split {n} example(s) into train and validation; add examples or give a validation file")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


def write_jsonl(path: str | Path, examples: list[dict]) -> None:
    """Write examples atomically (temporary file beside the target, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    tmp.replace(path)


def split_file(
    path: str | Path, out_dir: str | Path | None = None, val_fraction: float = 0.1, seed: int = 42
) -> tuple[Path, Path, int, int]:
    """Split a JSONL file into <stem>.train.jsonl and <stem>.val.jsonl, keeping lines verbatim."""
    path = Path(path)
    lines = []
    for raw in iter_raw_lines(path):
        if raw.data is None:
            raise DataError(f"{path}:{raw.number}: line too long to split; run `tunejob validate {path}`")
        if raw.data.strip():
            lines.append(raw.data)
    train, val = split_examples(lines, val_fraction, seed)
    out = Path(out_dir) if out_dir else path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".jsonl")
    train_path, val_path = out / f"{stem}.train.jsonl", out / f"{stem}.val.jsonl"
    for target, rows in ((train_path, train), (val_path, val)):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(b"".join(r + b"\n" for r in rows))
        tmp.replace(target)
    return train_path, val_path, len(train), len(val)

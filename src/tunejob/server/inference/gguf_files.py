"""The GGUF files `--engine llama.cpp` runs: a base model folder converted once, and each adapter
chatted with converted once beside it, cached under the server's data dir (`DATA_DIR/gguf/`).

Each file's name carries a digest of what it was made from (every file's name, size and
modification time in the model or adapter folder, and the type), so a model or checkpoint that
changes on disk is converted again, while an unchanged one is read from the cache at the next
start (SmolLM2-135M: ~10 s to convert, 0.27 GB in f16). The conversion is `tunejob export`'s own
(export/gguf_model.write_gguf, export/lora_gguf.write_adapter), written atomically, so a server
killed mid-conversion leaves no half file under the cached name.

What llama.cpp cannot run is refused before a chat is queued (`check`): a model family the export
does not write (export/tensors.FAMILIES) or an rsLoRA / DoRA adapter. Both are a 400 naming
`model` and saying to serve it with --engine local.
"""

from __future__ import annotations

import hashlib
import json
import threading
from functools import lru_cache
from pathlib import Path

from tunejob.errors import TunejobError
from tunejob.server.errors import ApiError

TYPES = ("f16", "q8_0", "f32")


def fingerprint(folder: Path, *extra: str) -> str:
    """A digest of a folder's files (relative name, size, mtime) and `extra`: changes when any file does."""
    h = hashlib.sha256("\0".join(extra).encode())
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        h.update(f"\0{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=32)
def refusal(base_path: str, adapter: str | None) -> str | None:
    """Why llama.cpp cannot run this base (+ adapter), from their configs alone; None if it can."""
    from transformers import AutoConfig

    from tunejob.export.tensors import family_of

    try:
        family_of(AutoConfig.from_pretrained(base_path))
    except TunejobError as exc:
        return str(exc)
    if adapter is not None:
        settings = json.loads((Path(adapter) / "adapter_config.json").read_text())
        if settings.get("use_rslora") or settings.get("use_dora"):
            return "rsLoRA / DoRA adapters have no llama.cpp equivalent"
    return None


def check(base_path: str, adapter: Path | None) -> None:
    """The 400 for a model llama.cpp cannot run (reads configs only: call it off the event loop)."""
    why = refusal(base_path, None if adapter is None else str(adapter))
    if why is not None:
        raise ApiError(400, f"This model cannot be served by --engine llama.cpp: {why}. Serve it with --engine local.",
                       param="model", code="model_not_supported")


class GgufFiles:
    def __init__(self, root: Path, kind: str = "f16", log=print):
        if kind not in TYPES:
            raise TunejobError(f"--chat-gguf-type {kind}: use one of {', '.join(TYPES)}")
        self.root, self.kind, self.log = Path(root), kind, log
        self._lock = threading.Lock()  # one conversion at a time (the chat thread converts; a second caller waits for the file)

    @property
    def adapter_kind(self) -> str:
        # A LoRA is a few MB: f16 (convert_lora_to_gguf.py's default) costs nothing and keeps its
        # small deltas that q8_0's per-block scale would round; f32 beside an f32 base, so that
        # f32 stays the exact reference.
        return "f32" if self.kind == "f32" else "f16"

    def base(self, base_path: str) -> Path:
        """The base model as GGUF at the server's type, converted now if not cached."""
        out = self.root / f"{Path(base_path).name}-{fingerprint(Path(base_path), self.kind)}-{self.kind}.gguf"
        with self._lock:
            if not out.is_file():
                self._convert_base(base_path, out)
        return out

    def adapter(self, adapter_dir: Path, base_path: str) -> Path:
        """A checkpoint's LoRA as a GGUF adapter for `base_path`, converted now if not cached."""
        digest = fingerprint(Path(adapter_dir), self.adapter_kind, str(Path(base_path).resolve()))
        out = self.root / "adapters" / f"{Path(adapter_dir).name}-{digest}-{self.adapter_kind}.gguf"
        with self._lock:
            if not out.is_file():
                from transformers import AutoConfig

                from tunejob.export.lora_gguf import write_adapter

                write_adapter(Path(adapter_dir), AutoConfig.from_pretrained(base_path), out, self.adapter_kind)
                self.log(f"chat: adapter {adapter_dir} converted to {out}")
        return out

    def _convert_base(self, base_path: str, out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from tunejob.export.gguf_model import write_gguf
        from tunejob.train.models import load_tokenizer

        self.log(f"chat: converting {base_path} to GGUF ({self.kind}) for llama.cpp, once: {out}")
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        write_gguf(model, load_tokenizer(base_path), Path(base_path), out, self.kind)

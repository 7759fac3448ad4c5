"""A Hugging Face tokenizer as GGUF metadata: tokens and their types, merges, the pre-tokenizer,
special tokens (BOS, EOS, end of turn) and the chat template.

Written the way llama.cpp's convert_hf_to_gguf.py writes a byte-level BPE vocabulary
(`get_vocab_base` + `_set_vocab_gpt2`), so llama.cpp, Ollama and transformers' GGUF loader read it
as that converter's files; merges, special ids, add_bos/add_eos and the template come from the
`gguf` package's own SpecialVocab.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from tunejob.data.templates import end_of_turn
from tunejob.errors import ModelError

# llama.cpp names each BPE pre-tokenizer (its split regex) by the sha256 of how the tokenizer
# encodes this text; llama.cpp refuses a BPE file whose `tokenizer.ggml.pre` it does not know.
# Text and hashes copied from convert_hf_to_gguf.py's get_vocab_base_pre (the Llama-family rows).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",       # Qwen1.5, Qwen2, Qwen2.5
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",      # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


# A tokenizer whose hash is not in the table (a known vocabulary split a new way, e.g. the SmolLM2
# vocabulary under transformers' Qwen2Tokenizer) is named by its split regex: that regex is what
# `tokenizer.ggml.pre` selects in llama.cpp (llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_*).
SPLIT_REGEXES = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "llama-bpe",
}


def _split_regex(tokenizer) -> str | None:
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split":
            return step.get("pattern", {}).get("Regex")
    return None


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (`tokenizer.ggml.pre`)."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest) or SPLIT_REGEXES.get(_split_regex(tokenizer))
    if name is None:
        raise ModelError(
            f"this tokenizer's BPE pre-tokenizer (hash {digest[:12]}) is not one GGUF export knows; "
            f"supported: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    return name


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special: added tokens that render as markup
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def tokens_and_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below vocab_size as (text, type): added special tokens are CONTROL (never printed,
    matched whole), other added ones USER_DEFINED, ids the tokenizer lacks padded as [PADi]."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            special = decoder[i].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def tokenizer_kind(tokenizer_dir: Path) -> str:
    spec = tokenizer_dir / "tokenizer.json"
    if not spec.is_file():
        raise ModelError(f"{tokenizer_dir}: no tokenizer.json; GGUF export reads a fast (tokenizers) tokenizer")
    model = json.loads(spec.read_text(encoding="utf-8"))["model"]
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return "gpt2"
    raise ModelError(
        f"{tokenizer_dir}: a {model.get('type')} tokenizer{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}; "
        "GGUF export supports byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) so far"
    )


def add_vocab(writer, tokenizer, tokenizer_dir: Path, vocab_size: int) -> str | None:
    """Write the vocabulary, special tokens and chat template; return the end-of-turn token."""
    import gguf

    tokenizer_kind(tokenizer_dir)
    tokens, types = tokens_and_types(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    special.chat_template = tokenizer.chat_template  # the one tunejob trained with, whatever file it came from
    special.add_to_gguf(writer, quiet=True)
    eot = end_of_turn(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot))
    return eot

"""A Hugging Face tokenizer as GGUF metadata: tokens and their types, merges, the pre-tokenizer,
special tokens (BOS, EOS, end of turn) and the chat template.

Written the way llama.cpp's convert_hf_to_gguf.py writes a byte-level BPE vocabulary
(`get_vocab_base` + `_set_vocab_gpt2`), so llama.cpp, Ollama and transformers' GGUF loader read it
as that converter's files; merges, special ids, add_bos/add_eos and the template come from the
`gguf` package's own SpecialVocab.
"""

from __future__ import annotations

import json
import re
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


def runtime_template(template: str | None) -> str | None:
    """The chat template without transformers' {% generation %} marks (training-only: they mark
    the assistant's tokens), which llama.cpp's Jinja engine does not know; what it renders is unchanged."""
    if template is None:
        return None
    template = re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)
    return re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)


def _spm_scores_and_types(tokens: list[str], types: list[int]) -> tuple[list[float], list[int]]:
    """SentencePiece-style (`tokenizer.ggml.model` llama) scores and byte types, as
    convert_hf_to_gguf.py's _create_vocab_sentencepiece writes them: <0xNN> pieces are BYTE (score
    0), added ones -1000, and a normal piece's score falls with its id. llama.cpp merges the
    highest-scoring pair first; a SentencePiece BPE model's pieces are stored in merge order, so
    -id keeps the order of the scores its .model file holds (Gemma 3's GGUF: strictly falling by id)."""
    import gguf

    scores, out = [], []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == gguf.TokenType.NORMAL and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            scores.append(0.0)
            out.append(gguf.TokenType.BYTE)
        else:
            scores.append(-float(i) if kind == gguf.TokenType.NORMAL else -1000.0)
            out.append(kind)
    return scores, out


def tokenizer_kind(tokenizer_dir: Path) -> str:
    """llama.cpp's tokenizer model for this folder: gpt2 (byte-level BPE) or llama (SentencePiece
    BPE with byte fallback: Gemma, Llama 2, Mistral v0.1)."""
    spec = tokenizer_dir / "tokenizer.json"
    if not spec.is_file():
        raise ModelError(f"{tokenizer_dir}: no tokenizer.json; GGUF export reads a fast (tokenizers) tokenizer")
    data = json.loads(spec.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return "gpt2"
    if model.get("type") == "BPE" and (data.get("normalizer") or {}).get("content") == "▁":
        return "llama"  # spaces as ▁ (Gemma's normalizer), bytes by fallback: SentencePiece's way
    raise ModelError(
        f"{tokenizer_dir}: a {model.get('type')} tokenizer with this normalizer is not one GGUF export writes; "
        "supported: byte-level BPE (SmolLM2, Llama 3, Qwen2) and SentencePiece BPE with byte fallback (Gemma 3)"
    )


def add_vocab(writer, tokenizer, tokenizer_dir: Path, vocab_size: int) -> str | None:
    """Write the vocabulary, special tokens and chat template; return the end-of-turn token."""
    import gguf

    kind = tokenizer_kind(tokenizer_dir)
    tokens, types = tokens_and_types(tokenizer, vocab_size)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    else:
        scores, types = _spm_scores_and_types(tokens, types)
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(False)  # the normalizer only replaces spaces; it prepends none
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=kind == "gpt2", n_vocab=vocab_size)
    special.chat_template = runtime_template(tokenizer.chat_template)  # the one tunejob trained with
    special.add_to_gguf(writer, quiet=True)
    eot = end_of_turn(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot))
    return eot

"""Chat examples -> token ids and labels, with the loss on assistant tokens only.

The model's own chat template renders the conversation. An assistant message's trained span is
found by rendering the conversation up to it (with the generation prompt) and up to its end: the
tokens in between are its content and end-of-turn marker, which is what the model must learn to
produce. Everything else (system, user, tool turns, the "<|im_start|>assistant" header) gets the
label -100 and costs no loss. Messages with `weight: 0` are rendered but not trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunejob.data.dataset import text_of

IGNORE = -100


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]
    source_index: int  # position of the example in its split, to name examples in a bad batch
    truncated: bool

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_trained_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def _render_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def _plain(messages: list[dict]) -> list[dict]:
    """Messages as the template expects them: role and text content only."""
    return [{"role": m["role"], "content": text_of(m.get("content"))} for m in messages]


def encode_example(tokenizer, messages: list[dict], max_len: int, train_on: str = "assistant", index: int = 0) -> Sequence:
    plain = _plain(messages)
    ids = _render_ids(tokenizer, plain)
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(messages):
            if m.get("role") != "assistant" or m.get("weight", 1) == 0:
                continue
            start = len(_render_ids(tokenizer, plain[:i], generation_prompt=True))
            end = len(_render_ids(tokenizer, plain[: i + 1]))
            labels[start:end] = ids[start:end]
    truncated = len(ids) > max_len
    return Sequence(ids[:max_len], labels[:max_len], index, truncated)


def encode_examples(tokenizer, examples: list[dict], max_len: int, train_on: str = "assistant") -> tuple[list[Sequence], EncodeStats]:
    """Encode a split; examples left with no trained token (truncated away, or all weight 0) are
    dropped and counted, since they would add nothing but padding."""
    stats, out = EncodeStats(), []
    for i, ex in enumerate(examples):
        seq = encode_example(tokenizer, ex["messages"], max_len, train_on, i)
        stats.examples += 1
        stats.truncated += seq.truncated
        if seq.trained_tokens == 0:
            stats.dropped_no_trained_tokens += 1
            continue
        stats.tokens += len(seq.input_ids)
        stats.trained_tokens += seq.trained_tokens
        out.append(seq)
    return out, stats

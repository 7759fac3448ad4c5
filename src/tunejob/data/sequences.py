"""Chat examples -> token ids and labels, with the loss on assistant tokens only.

Rendering goes through tool_calls.render_inputs (the template's own tool support, or the
Hermes / Qwen2.5 fallback).

Labels. Only what the model must produce is trained: each assistant turn's content (its calls
included) and end-of-turn marker. Headers, system, user and tool turns get IGNORE, as do turns
with `weight: 0`. The trained tokens are found by:
1. the template's `{% generation %}` blocks, when it has them: its author marked them;
2. otherwise each assistant turn's text is the rendering through it minus the rendering up to it
   with the generation prompt. It sits at that same place in the full rendering when the template
   renders prefixes consistently; when it does not (a header that changes with the conversation,
   such as a date), it is found after the turn's assistant header. Its edges must be token
   boundaries of the full token ids. A template that rewrites earlier turns (Qwen3 drops earlier
   reasoning) fails this and raises a one-line DataError: labels are never shifted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunejob.data.dataset import text_of
from tunejob.data.tool_calls import template_inputs, template_source
from tunejob.errors import DataError

IGNORE = -100
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
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


def plain_messages(messages: list[dict]) -> list[dict]:
    """Messages as role and text only (kept for callers that render tool-free prompts)."""
    return [{"role": m["role"], "content": text_of(m.get("content"))} for m in messages]


# ---------------------------------------------------------------- rendering and labels


def _render(tokenizer, msgs: list[dict], tools, index: int, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises many types; the template's message says what it rejects
        detail = " ".join(str(exc).split())[:200]
        raise DataError(f"example {index}: the chat template cannot render it ({type(exc).__name__}: {detail})") from None


def _ids(tokenizer, text: str) -> list[int]:
    # What apply_chat_template(tokenize=True) does with the rendered text.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _labels_from_mask(tokenizer, msgs, tools, trained: list[bool], ids: list[int]) -> list[int] | None:
    """Labels from the template's {% generation %} blocks; None when they cannot be trusted here."""
    try:
        out = tokenizer.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    except Exception:  # e.g. a slow tokenizer (no char offsets): the span method still works
        return None
    mask = list(out["assistant_masks"])
    if list(out["input_ids"]) != ids or not any(mask):
        return None
    spans: list[list[int]] = []  # runs of 1s, one per generation block
    for k, bit in enumerate(mask):
        if bit and (k == 0 or not mask[k - 1]):
            spans.append([k, k + 1])
        elif bit:
            spans[-1][1] = k + 1
    wanted = [t for m, t in zip(msgs, trained) if m["role"] == "assistant"]
    if not all(wanted):
        # weight 0 needs to know whose block is whose: one block per assistant turn, in order
        if len(spans) != len(wanted):
            return None
        spans = [s for s, t in zip(spans, wanted) if t]
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        labels[a:b] = ids[a:b]
    return labels


_FIXES = "use hyperparameters.train_on: all, or a chat template with {% generation %} markers"


def _locate(tokenizer, msgs, tools, i: int, text: str, turn: int, where: str, index: int) -> tuple[int, int]:
    """Character span, in the full rendering `text`, of assistant message i (the `turn`-th)."""
    if i == 0:
        raise DataError(f"{where} opens the conversation, so nothing renders before it to tell its tokens from the "
                        f"template's header; put a user message before it or set weight: 0 on it")
    before = _render(tokenizer, msgs[:i], tools, index, generation_prompt=True)
    through = _render(tokenizer, msgs[: i + 1], tools, index)
    if text.startswith(through) and through.startswith(before) and len(through) > len(before):
        return len(before), len(through)  # the template renders prefixes consistently: the usual case
    # Otherwise anchor on the generation prompt: it must open this turn in the rendering through
    # it (the turn-th occurrence) and each assistant turn of the full rendering exactly once.
    history = _render(tokenizer, msgs[:i], tools, index)
    header = before[len(history):] if before.startswith(history) else ""
    in_through = _find_all(through, header)
    if len(in_through) != turn:
        raise DataError(f"{where}: the chat template's generation prompt is not how it starts a rendered assistant turn "
                        f"(e.g. it adds an empty <think> block), so assistant-only labels cannot be found; {_FIXES}")
    in_text = _find_all(text, header)
    if len(in_text) != sum(1 for m in msgs if m["role"] == "assistant"):
        raise DataError(f"{where}: the chat template renders earlier turns differently once later turns follow, and its "
                        f"assistant header does not mark each assistant turn once, so assistant-only labels cannot be "
                        f"found; {_FIXES}")
    span, a = through[in_through[-1] + len(header):], in_text[turn - 1] + len(header)
    if not span or not text.startswith(span, a):
        raise DataError(f"{where}: the chat template renders this turn differently once later turns follow (it drops or "
                        f"rewrites it, e.g. earlier reasoning), so its trained tokens cannot be located; set weight: 0 on "
                        f"that turn or end the example there, or {_FIXES}")
    return a, a + len(span)


def _find_all(text: str, needle: str) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(needle), text)] if needle else []


def _token_boundary(tokenizer, text: str, pos: int, ids: list[int]) -> int | None:
    """Number of tokens of `ids` (the tokens of `text`) covering text[:pos] exactly, or None when a
    token straddles pos (the tokenizer merged across it), where any split would shift labels."""
    if pos == len(text):
        return len(ids)
    head = _ids(tokenizer, text[:pos])
    return len(head) if ids[: len(head)] == head else None


def _labels_by_span(tokenizer, msgs, tools, trained: list[bool], ids: list[int], text: str, index: int) -> list[int]:
    labels, turn = [IGNORE] * len(ids), 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        turn += 1
        if not trained[i]:
            continue
        where = f"example {index}: assistant turn {turn}"
        a, b = _locate(tokenizer, msgs, tools, i, text, turn, where, index)
        ka, kb = _token_boundary(tokenizer, text, a, ids), _token_boundary(tokenizer, text, b, ids)
        if ka is None or kb is None or kb <= ka:
            raise DataError(f"{where}: this tokenizer merges the turn's first or last characters with the text next to "
                            f"them into one token, so its labels cannot be cut at the turn's edges; {_FIXES}")
        labels[ka:kb] = ids[ka:kb]
    return labels


def encode_example(tokenizer, messages: list[dict], max_len: int, train_on: str = "assistant", index: int = 0,
                   tools: list | None = None, functions: list | None = None) -> Sequence:
    msgs, tools = template_inputs(tokenizer, messages, tools, functions)
    trained = [m["role"] == "assistant" and m.get("weight", 1) != 0 for m in msgs]
    msgs = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    text = _render(tokenizer, msgs, tools, index)
    ids = _ids(tokenizer, text)
    if train_on == "all":
        # The loss predicts token t from tokens before it, so token 0 is never scored: label it
        # IGNORE so trained_tokens counts the positions that really carry loss.
        labels = [IGNORE] + ids[1:] if ids else []
    elif not any(trained):
        labels = [IGNORE] * len(ids)
    else:
        labels = None
        if _GENERATION_RE.search(template_source(tokenizer, tools)):
            labels = _labels_from_mask(tokenizer, msgs, tools, trained, ids)
        if labels is None:
            labels = _labels_by_span(tokenizer, msgs, tools, trained, ids, text, index)
    truncated = len(ids) > max_len
    return Sequence(ids[:max_len], labels[:max_len], index, truncated)


def encode_examples(tokenizer, examples: list[dict], max_len: int, train_on: str = "assistant") -> tuple[list[Sequence], EncodeStats]:
    """Encode a split; examples left with no trained token (truncated away, or all weight 0) are
    dropped and counted, since they would add nothing but padding."""
    stats, out = EncodeStats(), []
    for i, ex in enumerate(examples):
        seq = encode_example(tokenizer, ex["messages"], max_len, train_on, i, ex.get("tools"), ex.get("functions"))
        stats.examples += 1
        stats.truncated += seq.truncated
        if seq.trained_tokens == 0:
            stats.dropped_no_trained_tokens += 1
            continue
        stats.tokens += len(seq.input_ids)
        stats.trained_tokens += seq.trained_tokens
        out.append(seq)
    return out, stats

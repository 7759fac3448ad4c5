"""Preference pairs (OpenAI's DPO format): the two conversations of a pair, and their tokens.

    {"input": {"messages": [...], "tools": [...]},
     "preferred_output": [{"role": "assistant", ...}], "non_preferred_output": [{"role": "assistant", ...}]}

Each side is encoded as the input followed by its output, through the same chat rendering and
assistant-only labels as supervised training (data/sequences.py). Only the output is labelled:
assistant turns inside the input get weight 0, so a pair's log-probability is that of what the two
sides disagree on, not of the shared history.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunejob.data.sequences import EncodeStats, Sequence, encode_example

SIDES = ("preferred_output", "non_preferred_output")


def is_pair(example: dict) -> bool:
    return "preferred_output" in example


def side_messages(pair: dict, side: str, train_input: bool = True) -> list[dict]:
    """The input conversation followed by one side's output. With train_input False the input's
    assistant turns carry weight 0 (labels on the output only)."""
    history = list(pair["input"]["messages"])
    if not train_input:
        history = [dict(m, weight=0) if m.get("role") == "assistant" else m for m in history]
    return history + list(pair[side])


def conversations(pair: dict) -> list[list[dict]]:
    """[preferred conversation, non-preferred conversation] (for token counting)."""
    return [side_messages(pair, side) for side in SIDES]


@dataclass
class PairSequence:
    chosen: Sequence
    rejected: Sequence
    source_index: int

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def encode_pairs(tokenizer, pairs: list[dict], max_len: int) -> tuple[list[PairSequence], EncodeStats]:
    """Encode a split of pairs. A pair where either side has no labelled token left after
    truncation is dropped and counted: it would compare a prompt with itself."""
    stats, out = EncodeStats(), []
    for i, pair in enumerate(pairs):
        tools, functions = pair["input"].get("tools"), pair["input"].get("functions")
        chosen, rejected = (encode_example(tokenizer, side_messages(pair, side, train_input=False), max_len, "assistant", i, tools, functions)
                            for side in SIDES)
        stats.examples += 1
        stats.truncated += chosen.truncated or rejected.truncated
        if not chosen.trained_tokens or not rejected.trained_tokens:
            stats.dropped_no_trained_tokens += 1
            continue
        stats.tokens += len(chosen.input_ids) + len(rejected.input_ids)
        stats.trained_tokens += chosen.trained_tokens + rejected.trained_tokens
        out.append(PairSequence(chosen, rejected, i))
    return out, stats

"""Reinforcement fine-tuning data: OpenAI's format, a prompt conversation per line plus any other
fields, which the grader reads as `item.*` ({{item.answer}}). The model's answers are not in the
file: training samples them (train/rollout.py) and the grader scores them.

    {"messages": [{"role": "user", "content": "Capital of France?"}], "capital": "Paris"}

A prompt is rendered as serve renders a chat request (the chat template with the generation prompt,
tools as tool_calls.render_inputs puts them), so the policy trains on what it will be asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunejob.data import tool_calls
from tunejob.data.sequences import EncodeStats
from tunejob.errors import DataError


@dataclass
class PromptSequence:
    input_ids: list[int]  # the rendered prompt, ending with the assistant's generation prompt
    item: dict  # the whole line: the grader's `item`
    source_index: int  # position in its split

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def prompt_messages(line: dict) -> list[dict]:
    """The conversation to answer; OpenAI's `developer` turn is the system turn of an open model."""
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in line["messages"]]


def encode_prompts(tokenizer, lines: list[dict], max_len: int, completion_tokens: int) -> tuple[list[PromptSequence], EncodeStats]:
    """Token ids of each line's prompt. A prompt that leaves fewer than `completion_tokens` of
    max_len for its answer is an error, not a silent cut: a cut prompt asks another question."""
    stats, seqs = EncodeStats(), []
    for i, line in enumerate(lines):
        messages, tools = tool_calls.render_inputs(tokenizer, prompt_messages(line), line.get("tools") or None)
        ids = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        if len(ids) + completion_tokens > max_len:
            raise DataError(f"example {i}: its prompt is {len(ids)} tokens, and with method.completion_tokens {completion_tokens} "
                            f"that is over hyperparameters.max_seq_len {max_len}; raise max_seq_len or shorten the prompt")
        seqs.append(PromptSequence(ids, line, i))
        stats.examples += 1
        stats.tokens += len(ids)
    return seqs, stats

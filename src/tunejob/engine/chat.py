"""One chat completion's request and result, engine-side: what a conversation (with tools) asks
for, its prompt as the template renders it, and the generated tokens turned back into OpenAI's
content or tool calls, finish reason and logprobs.

Prompts are rendered exactly as training rendered them (data.tool_calls.render_inputs: the
template's own tool support, or the Hermes-style fallback), and generated <tool_call> blocks are
parsed back into OpenAI tool calls. serve, `tunejob chat`, eval, the demo, the dashboard and
migrate's comparison all answer through these (answers.py runs them in the calling thread;
server/inference/generation.py on serve's chat thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tunejob.data import tool_calls
from tunejob.engine import text


@dataclass
class ChatRequest:
    """What one completion needs. Sampling defaults are OpenAI's (temperature 1, top_p 1);
    temperature 0 asks for greedy decoding. The engine (engine/batch.py) reads the rest: stop
    strings, penalties, logprobs (None, or how many top_logprobs), response_format."""

    messages: list[dict]
    tools: list[dict] = field(default_factory=list)
    tool_choice: str = "auto"  # "auto" or "none"
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    response_format: dict | None = None

    def choice(self, index: int) -> "ChatRequest":
        """The request for choice `index` of n: its own seed stream (seed + index), so choices differ
        and each is reproducible alone."""
        seed = None if self.seed is None else (self.seed + index + 2**63) % 2**64 - 2**63
        return replace(self, seed=seed, n=1)

    @property
    def parses_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


@dataclass
class ChatResult:
    content: str | None
    tool_calls: list[dict]
    finish_reason: str  # "stop" (the model ended), "length" (max_tokens), "tool_calls", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None  # OpenAI's choices[].logprobs.content, when asked
    index: int = 0
    cached_tokens: int = 0  # of prompt_tokens, read from the engine's prompt cache rather than computed
    seconds: float | None = None  # answered in the calling thread (answers.py): its batch's start to its last token


def prompt_inputs(tokenizer, request: ChatRequest, device):
    messages, tools = tool_calls.render_inputs(tokenizer, request.messages, request.tools or None)
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).to(device)


def to_result(tokenizer, request: ChatRequest, prompt_tokens: int, new: list[int], eos: set[int], cancelled: bool,
              logprobs: list | None = None) -> ChatResult:
    """The generated tokens as OpenAI's content or tool calls, finish reason, logprobs and usage.
    A stop string ends the content where it begins (finish "stop", even at max_tokens)."""
    answer = tokenizer.decode(new, skip_special_tokens=True)
    cut = text.first_stop(answer, request.stop)
    ended = (len(new) > 0 and new[-1] in eos) or cut is not None
    finish = "cancelled" if cancelled else "length" if len(new) >= request.max_tokens and not ended else "stop"
    answer = answer if cut is None else answer[:cut]
    content, calls = tool_calls.parse_tool_calls(answer.strip()) if request.parses_calls else (answer.strip(), [])
    if calls and finish != "cancelled":
        finish = "tool_calls"
    shown = None
    if logprobs is not None:  # the tokens that carry the content: not the end-of-text token, none past a stop string
        count = text.visible_tokens(tokenizer, new, cut) if cut is not None else len(new) - (1 if ended else 0)
        shown = openai_logprobs(tokenizer, logprobs[:count])
    return ChatResult(content=content or (None if calls else ""), tool_calls=calls, finish_reason=finish,
                      prompt_tokens=prompt_tokens, completion_tokens=len(new), logprobs=shown)


def openai_logprobs(tokenizer, entries: list) -> list[dict]:
    """engine.logits.TokenLogprob entries as OpenAI's ChatCompletionTokenLogprob: the token's text
    (U+FFFD for part of a character, as vLLM writes it), its logprob, its bytes, and the top ones."""
    def one(token: int, logprob: float) -> dict:
        raw = text.token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]

"""From one row's last-position logits to its next token, in the order transformers' generate()
applies its processors and then its warpers: OpenAI's penalties, the response_format mask, then
temperature and top-p (greedy: argmax); and, when asked, the logprobs of what was chosen.

Penalties as OpenAI defines them (its "Parameter details" guide):
    logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
where c[j] counts token j among the tokens generated so far in this row (not the prompt).

Logprobs are of the distribution the token was drawn from: log-softmax of the logits after the
penalties, the mask, temperature and top-p, which is what transformers' generate() reports as
`output_scores` (its processed scores) and vLLM as `--logprobs-mode processed_logprobs`. Why not the
raw model output: a client that reads logprobs to judge confidence in an answer should see the
odds the answer was actually chosen by; under a schema, a token the grammar forbids had no chance,
whatever the raw model thought. Greedy decoding reports temperature 1 (its "distribution" is the
processed logits; temperature 0 would give every token but one -inf). Tokens that distribution
cannot draw (-inf: masked, or outside top-p) are left out of top_logprobs, which OpenAI allows
("fewer than requested"), since JSON has no -inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunejob.engine import grammar


@dataclass
class TokenLogprob:
    """One generated token's logprob and the `top` most likely (token, logprob) of its distribution."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Decoding:
    """One row's token choice: its penalties' counts, its grammar state, the logprobs it reports."""

    def __init__(self, request, tokenizer, eos: set[int], generator: torch.Generator | None):
        self.request, self.tokenizer, self.eos, self.generator = request, tokenizer, eos, generator
        self.presence = getattr(request, "presence_penalty", 0.0)
        self.frequency = getattr(request, "frequency_penalty", 0.0)
        self.top_logprobs: int | None = getattr(request, "logprobs", None)  # None: not asked; k: the top k too
        self.schema = grammar.schema_of(getattr(request, "response_format", None))
        self.constraint: grammar.Constraint | None = None
        self.counts: torch.Tensor | None = None  # times each token was generated, for the penalties
        self.logprobs: list[TokenLogprob] = []
        # greedy with no penalty, grammar or logprobs: the token is the logits' argmax as they come
        # (server/inference/llama.py takes it from llama.cpp's buffer without making a tensor)
        self.plain_greedy = (getattr(request, "temperature", 0) <= 0 and not self.presence and not self.frequency
                             and self.schema is None and self.top_logprobs is None)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after the penalties and the grammar's mask."""
        if self.counts is not None and (self.presence or self.frequency):
            logits = logits - self.counts * self.frequency - (self.counts > 0).float() * self.presence
        if self.schema is not None:
            if self.constraint is None:  # built at the first step: the mask is as wide as the model's logits
                self.constraint = grammar.Constraint(self.schema, self.tokenizer, logits.shape[-1], self.eos)
            logits = self.constraint.mask(logits)
        return logits

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from the row's last-position logits (fp32); records its logprob and
        advances the penalties' counts and the grammar."""
        req = self.request
        scores = self.scores(logits)
        if req.temperature <= 0:
            token = int(scores.argmax())
        else:
            scores = scores / req.temperature
            if req.top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
                ordered, index = scores.sort(descending=True)
                outside = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1) >= req.top_p
                outside[0] = False  # the most likely token always stays (top_p 0 would leave none: NaN, a 500)
                scores = scores.index_fill(0, index[outside], float("-inf"))
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))
        if self.top_logprobs is not None:
            self.logprobs.append(_logprob(scores, token, self.top_logprobs))
        self._advance(token, logits.shape[-1])
        return token

    def _advance(self, token: int, vocab: int) -> None:
        if self.presence or self.frequency:
            if self.counts is None:
                self.counts = torch.zeros(vocab)
            self.counts[token] += 1
        if self.constraint is not None:
            self.constraint.accept(token)


def _logprob(scores: torch.Tensor, token: int, k: int) -> TokenLogprob:
    logp = scores.log_softmax(-1)
    top = []
    if k:
        values, index = logp.topk(k)
        top = [(int(i), float(v)) for v, i in zip(values, index) if v > float("-inf")]
    return TokenLogprob(token, float(logp[token]), top)

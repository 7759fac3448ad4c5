"""serve's prompt cache (server/inference/prompt_cache.py) under random interleavings of rows joining
and finishing (hypothesis stateful), on a model of llama.cpp's sequence memory: `llama_memory_seq_cp`
gives a sequence the source's positions [p0, p1), `llama_memory_seq_rm(seq, -1, -1)` empties it.
The real llama.cpp context runs in tests/test_serve_llama_cpp.py (answers, adapters, a full pool);
here the bookkeeping: every entry's sequence holds exactly its tokens, a reused prefix is the
prompt's own under the same adapter, slots never leak, and the bounds hold after every step."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tunejob.server.inference.prompt_cache import PromptCache

ROWS, SLOTS, MAX_CELLS = 2, 3, 16  # answers of up to 18 tokens: some are too long to keep


class Memory:
    """{sequence: its tokens by position}: what llama.cpp's cells hold for each sequence."""

    def __init__(self):
        self.seqs: dict[int, list[int]] = {}

    def seq_cp(self, memory, src: int, dst: int, p0: int, p1: int) -> None:
        assert not self.seqs.get(dst), "copied into a sequence that still holds cells"
        self.seqs[dst] = list(self.seqs[src][p0:p1])
        assert len(self.seqs[dst]) == p1 - p0, "copied positions the source does not hold"

    def seq_rm(self, memory, seq: int, p0: int, p1: int) -> None:
        assert (p0, p1) == (-1, -1)
        self.seqs.pop(seq, None)


tokens = st.lists(st.integers(0, 3), min_size=1, max_size=12)  # a 4-token vocabulary: prefixes are shared often


class PromptCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.mem = Memory()
        llama = SimpleNamespace(llama_memory_seq_cp=self.mem.seq_cp, llama_memory_seq_rm=self.mem.seq_rm)
        self.cache = PromptCache(llama, None, first_seq=ROWS, slots=SLOTS, max_cells=MAX_CELLS)
        self.rows: dict[int, tuple[str | None, list[int]]] = {}  # seq -> (adapter, its prompt)

    @rule(seq=st.integers(0, ROWS - 1), adapter=st.sampled_from([None, "a"]), prompt=tokens, need=st.integers(0, 24))
    def join(self, seq, adapter, prompt, need):
        if seq in self.rows:
            return
        before = {(e.adapter, tuple(e.tokens)) for e in self.cache.entries}
        n = self.cache.reuse(adapter, prompt, seq)
        assert 0 <= n <= len(prompt) - 1
        assert self.mem.seqs.get(seq, []) == prompt[:n]  # the prompt's own tokens, nothing else
        best = max((len(_common(t, prompt)) for a, t in before if a == adapter), default=0)
        assert n == min(best, len(prompt) - 1)  # the longest prefix held for this adapter
        self.cache.make_room(MAX_CELLS - need)
        assert self.cache.held() <= max(MAX_CELLS - need, 0)
        self.mem.seqs[seq] = list(prompt)  # the prefill writes the rest of the prompt
        self.rows[seq] = (adapter, prompt)

    @rule(seq=st.integers(0, ROWS - 1), answer=st.lists(st.integers(0, 3), max_size=6))
    def finish(self, seq, answer):
        if seq not in self.rows:
            return
        adapter, prompt = self.rows.pop(seq)
        self.mem.seqs[seq] = prompt + answer  # decoded: the prompt and every answer token
        self.cache.keep(adapter, prompt + answer, seq)
        self.mem.seq_rm(None, seq, -1, -1)  # LlamaBatch._forget

    @invariant()
    def entries_hold_their_tokens_within_bounds(self):
        entries = self.cache.entries
        assert all(self.mem.seqs.get(e.seq) == e.tokens for e in entries)
        assert len(entries) <= SLOTS and self.cache.held() <= MAX_CELLS
        assert sorted([e.seq for e in entries] + self.cache.free) == list(range(ROWS, ROWS + SLOTS))  # no slot leaks
        assert not any(s in self.mem.seqs for s in self.cache.free)  # a free slot holds no cells


def _common(a, b):
    out = []
    for x, y in zip(a, b):
        if x != y:
            break
        out.append(x)
    return out


TestPromptCache = PromptCacheMachine.TestCase
TestPromptCache.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)

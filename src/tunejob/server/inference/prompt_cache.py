"""The llama.cpp engine's prompt cache: the KV cells of recent chats, kept so that a chat that starts
with the same tokens (a shared system prompt, the same question again, the next turn of a
conversation) decodes only what follows them. OpenAI calls this prompt caching and reports it as
`usage.prompt_tokens_details.cached_tokens`; serve reports it the same way.

Why: on a 2-core CPU the prompt is most of a short chat's first-token time, and llama.cpp's own
loop (llama-cpp-python's `Llama`) already skips the prompt prefix it evaluated last time, so serve
without a cache lost to it on every repeated system prompt.

How: each entry is a llama.cpp sequence of its own in the base's one context (sequence ids after the
rows'), holding the cells of a finished row: its prompt and its answer but the last token, which was
never decoded. The KV pool is unified (`kv_unified`), so `llama_memory_seq_cp` adds a sequence id to
cells rather than copying them: keeping a row and handing its prefix to a new row cost no decode.
An entry belongs to one adapter: a LoRA on the attention projections changes the keys and values,
so one adapter's cells are never read under another.

Bounds: at most `slots` entries holding at most `max_cells` cells, and fewer whenever rows need the
cells (`make_room`, which LlamaBatch calls before a prefill): cached cells are a reserve, never a
reason to refuse a chat. Oldest entries go first. Every held cell still costs a little at each
decode (llama.cpp's attention spans the used cells and masks the others), hence the bound.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Entry:
    seq: int  # its llama.cpp sequence id
    adapter: str | None
    tokens: list[int]  # the tokens whose KV the sequence holds, positions 0..len-1


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """Entries on one llama.cpp context.

        cache = PromptCache(llama_cpp, memory, first_seq=rows, slots=4, max_cells=pool // 4)
        skipped = cache.reuse(adapter, prompt, seq)   # seq now holds prompt[:skipped]'s KV
        cache.keep(adapter, prompt + answer[:-1], seq)  # before seq's cells are removed
    """

    def __init__(self, llama, memory, first_seq: int, slots: int, max_cells: int):
        self.llama, self.memory, self.max_cells = llama, memory, max_cells
        self.entries: list[Entry] = []  # least recently used first
        self.free = list(range(first_seq + slots - 1, first_seq - 1, -1))

    def held(self) -> int:
        """Cells the entries hold, counting a cell shared by two entries twice (an upper bound)."""
        return sum(len(e.tokens) for e in self.entries)

    def reuse(self, adapter: str | None, prompt: list[int], seq: int) -> int:
        """Give the empty sequence `seq` the cells of the longest cached prefix of `prompt` under
        `adapter`; returns how many prompt tokens it holds now (at most all but the last, whose
        logits the row's first token needs)."""
        best, n = None, 0
        for entry in self.entries:
            if entry.adapter == adapter and (k := common_prefix(entry.tokens, prompt)) > n:
                best, n = entry, k
        n = min(n, len(prompt) - 1)
        if best is None or n <= 0:
            return 0
        self.llama.llama_memory_seq_cp(self.memory, best.seq, seq, 0, n)
        self._touch(best)
        return n

    def keep(self, adapter: str | None, tokens: list[int], seq: int) -> None:
        """Keep the cells of sequence `seq`, which holds `tokens`, before that sequence is removed."""
        if not 0 < len(tokens) <= self.max_cells:
            return
        for entry in list(self.entries):
            if entry.adapter != adapter:
                continue
            if tokens[: len(entry.tokens)] == entry.tokens:  # the new one holds all of it
                self._drop(entry)
            elif entry.tokens[: len(tokens)] == tokens:  # already held: it is just used again
                self._touch(entry)
                return
        while self.entries and (not self.free or self.held() + len(tokens) > self.max_cells):
            self._drop(self.entries[0])
        if not self.free:  # no slots at all
            return
        slot = self.free.pop()
        self.llama.llama_memory_seq_cp(self.memory, seq, slot, 0, len(tokens))
        self.entries.append(Entry(slot, adapter, list(tokens)))

    def make_room(self, cells: int) -> None:
        """Drop entries, oldest first, until they hold at most `cells` (rows need the rest)."""
        while self.entries and self.held() > max(cells, 0):
            self._drop(self.entries[0])

    def _touch(self, entry: Entry) -> None:
        """Make `entry` the most recently used (the last to be dropped)."""
        self.entries.remove(entry)
        self.entries.append(entry)

    def _drop(self, entry: Entry) -> None:
        self.llama.llama_memory_seq_rm(self.memory, entry.seq, -1, -1)
        self.entries.remove(entry)
        self.free.append(entry.seq)

"""The chat batch's KV cache: transformers' DynamicCache whose plain layers grow in place.

Why: DynamicLayer appends each decoding step's keys and values with torch.cat, which copies the
layer's whole cache every token; with 8 rows of SmolLM2-135M in fp32 that copy was 12% of a step
(bench/profile_decode.py). A GrowingLayer keeps its keys and values as views into buffers with
ROOM spare positions and writes each token in place, reallocating once every ROOM tokens. Not
transformers' StaticCache: rows join and leave a batch mid-flight (server/batch.py pads, joins and
trims the per-layer tensors), which a fixed-shape cache does not allow.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

ROOM = 64  # spare token positions a layer's buffers keep


class GrowingLayer(DynamicLayer):
    """Keys and values are views into buffers with room to grow. The batch's joins and trims put
    new tensors in keys/values; the next update sees another storage and builds buffers around them."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, add = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        room = getattr(self, "_room", None)
        if room is None or not length or room[0].data_ptr() != self.keys.data_ptr() or room[0].shape[-2] < length + add:
            room = tuple(new.new_empty((*new.shape[:-2], length + add + ROOM, new.shape[-1])) for new in (key_states, value_states))
            if length:
                room[0][..., :length, :], room[1][..., :length, :] = self.keys, self.values
            self._room = room
        room[0][..., length:length + add, :], room[1][..., length:length + add, :] = key_states, value_states
        self.keys, self.values = room[0][..., :length + add, :], room[1][..., :length + add, :]
        return self.keys, self.values


def new_cache(config) -> DynamicCache:
    """The model's DynamicCache (its layer types from `config`), plain layers replaced by GrowingLayer."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache

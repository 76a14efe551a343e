"""A key/value cache whose layers may hold different numbers of positions.

Self-speculation leaves drafted tokens at different depths: layer l holds the positions that have
been run through layer l. Buffers are preallocated; each layer keeps an explicit length; a write
goes at that length; rollback moves the length and copies nothing.
"""

from __future__ import annotations

import torch


class LayeredKVCache:
    """Implements the one method transformers' attention modules call: `update`."""

    def __init__(self, num_layers: int, max_length: int) -> None:
        self.max_length = max_length
        self.lengths = [0] * num_layers
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append [1, heads, k, dim] keys/values to layer `layer_idx`; return all keys/values so far."""
        start = self.lengths[layer_idx]
        end = start + key_states.shape[-2]
        if end > self.max_length:
            raise RuntimeError(f"KV cache overflow at layer {layer_idx}: {end} > {self.max_length}")
        keys = self._keys[layer_idx]
        if keys is None:
            shape = (*key_states.shape[:-2], self.max_length, key_states.shape[-1])
            keys = self._keys[layer_idx] = key_states.new_empty(shape)
            vshape = (*value_states.shape[:-2], self.max_length, value_states.shape[-1])
            self._values[layer_idx] = value_states.new_empty(vshape)
        values = self._values[layer_idx]
        keys[..., start:end, :] = key_states
        values[..., start:end, :] = value_states
        self.lengths[layer_idx] = end
        return keys[..., :end, :], values[..., :end, :]

    def truncate(self, length: int) -> None:
        """Forget every position at or after `length`, in every layer."""
        self.lengths = [min(n, length) for n in self.lengths]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

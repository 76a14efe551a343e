"""The one place that touches a Hugging Face model: run layers i..j for some positions, and heads.

Uses only the model's public submodules (embeddings, decoder layers, rotary embedding, final norm,
LM head). No modeling code is copied and nothing on the model is changed.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .cache import LayeredKVCache
from .errors import ModelError
from .host import read, to_device

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Attention kernels whose masks this adapter builds exactly as transformers does for generate().
SUPPORTED_ATTENTION = ("sdpa", "eager")
# RoPE variants whose tables depend on the longest position seen so far: generate() recomputes
# them as the sequence grows, so a table built once for all positions would differ.
POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


class LayerModel(Protocol):
    """What the decode loop needs from a model."""

    num_layers: int
    vocab_size: int

    def new_cache(self, max_length: int) -> LayeredKVCache: ...

    def embed(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor: ...

    def run_layer(self, layer: int, hidden: torch.Tensor, start: int, cache: LayeredKVCache) -> torch.Tensor: ...

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def exit_logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor: ...

    def exit_token(self, index: int) -> int: ...

    def next_token_draft(self, final_hidden: torch.Tensor, embedded: torch.Tensor) -> int: ...

    # whether next_token_draft can be called (the exit head holds a fitted next-token head)
    has_next_token_head: bool

    # token id of each exit_logits column on the device, or None when column i is token i
    exit_columns: torch.Tensor | None


class HFCausalLM:
    """LayerModel over a transformers *ForCausalLM of a supported architecture (decoder-only, RoPE)."""

    def __init__(self, model: torch.nn.Module, exit_weights=None, kernels=None) -> None:
        """kernels: a kernels.Kernels built for this model (prepacked fast paths); None runs
        every module's own forward."""
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in SUPPORTED_ATTENTION:
            raise ModelError(
                f"attention implementation {attention!r} is not supported; load the model with "
                f"attn_implementation='sdpa' (or 'eager')"
            )
        for rope_type in _rope_types(config):
            if any(kind in rope_type for kind in POSITION_DEPENDENT_ROPE):
                raise ModelError(
                    f"RoPE type {rope_type!r} changes its tables with the sequence length, which the "
                    f"layer-wise cache cannot reproduce exactly; supported: default, linear, yarn, llama3"
                )
        self.model = model
        self.config = config
        if kernels is not None and kernels.model is not model:
            raise ValueError("kernels were built for another model")
        self.kernels = kernels
        body = model.model
        self._embed = body.embed_tokens
        self._layers = list(body.layers)
        self._norm = body.norm
        self._rotary = body.rotary_emb
        self._lm_head = model.lm_head
        self.num_layers = len(self._layers)
        self.vocab_size = int(config.vocab_size)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._sdpa = attention == "sdpa"
        self._exit_head = None
        self._exit_tokens = None
        self.exit_columns = None
        self.has_next_token_head = False
        if exit_weights is not None:
            from .exit_head import FittedExitHead

            self._exit_head = FittedExitHead(exit_weights, self._norm, self._lm_head.weight, self._softcap)
            self._exit_tokens = self._exit_head.token_list
            if self._exit_head.token_ids is not None:
                self.exit_columns = self._exit_head.token_ids.to(self._lm_head.weight.device)
            self.has_next_token_head = self._exit_head.has_next_head
        layer_types = getattr(config, "layer_types", None) or [None] * self.num_layers
        window = getattr(config, "sliding_window", None)
        self._layer_types = list(layer_types)
        if model_type == "mistral":  # one window for every layer
            self._windows = [window] * self.num_layers
        else:
            self._windows = [window if t == "sliding_attention" else None for t in self._layer_types]
        self._rope_per_type = model_type == "gemma3_text"
        self._rope: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_length = 0
        self._last_mask: tuple[tuple, torch.Tensor] | None = None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # -- positions -------------------------------------------------------------------------------

    def _rope_table(self, layer_type, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if end > self._rope_length:
            length = max(end, 2 * self._rope_length, 256)
            positions = torch.arange(length, device=self.device)[None]
            probe = torch.empty(1, 1, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                for t in set(self._layer_types):
                    if self._rope_per_type:
                        self._rope[t] = self._rotary(probe, positions, t)
                    else:
                        self._rope[t] = self._rotary(probe, positions)
            self._rope_length = length
        return self._rope[layer_type]

    def _mask(self, start: int, k: int, window: int | None) -> torch.Tensor | None:
        """Causal (and sliding-window) mask for queries start..start+k-1 over keys 0..start+k-1.

        With SDPA, no mask where transformers' `_ignore_causal_mask_sdpa` skips it for the same
        positions in generate() (one query, or a prefill, and for a sliding layer only while every
        key lies inside the window), so the same kernel path runs; a mask everywhere else."""
        if self._sdpa and sdpa_skips_mask(start, k, window):
            return None
        key = (start, k, window)
        if self._last_mask is not None and self._last_mask[0] == key:  # every layer of a pass asks for the same mask
            return self._last_mask[1]
        mask = self._build_mask(start, k, window)
        self._last_mask = (key, mask)
        return mask

    def _build_mask(self, start: int, k: int, window: int | None) -> torch.Tensor:
        q = torch.arange(start, start + k, device=self.device)[:, None]
        kv = torch.arange(start + k, device=self.device)[None, :]
        allowed = kv <= q
        if window is not None:
            allowed = allowed & (kv > q - window)
        if self._sdpa:
            return allowed[None, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[None, None]

    # -- LayerModel ------------------------------------------------------------------------------

    def new_cache(self, max_length: int) -> LayeredKVCache:
        if self.kernels is not None:  # once per generation: weights edited or hooked since load?
            self.kernels.refresh()
        return LayeredKVCache(self.num_layers, max_length)

    def embed(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Token ids (a host list is copied straight to the model's device) -> hidden [1, k, H]."""
        if not isinstance(token_ids, torch.Tensor):
            token_ids = to_device(list(token_ids), self.device)
        elif token_ids.device != self.device:
            token_ids = token_ids.to(self.device)
        return self._embed(token_ids.view(1, -1))

    def run_layer(self, layer: int, hidden: torch.Tensor, start: int, cache: LayeredKVCache) -> torch.Tensor:
        """Run decoder layer `layer` (0-based) over positions start..start+k-1 given as hidden [1, k, H]."""
        k = hidden.shape[1]
        end = start + k
        if cache.lengths[layer] != start:  # a drafter bug would write positions out of place
            raise RuntimeError(
                f"layer {layer} holds {cache.lengths[layer]} cached positions but is asked to write at {start}"
            )
        layer_type = self._layer_types[layer]
        cos, sin = self._rope_table(layer_type, end)
        mask = self._mask(start, k, self._windows[layer])
        fast = None if self.kernels is None else self.kernels.layer(layer)
        if fast is not None:
            return fast(hidden, mask, (cos[:, start:end], sin[:, start:end]), cache)
        position_ids = torch.arange(start, end, device=self.device)[None]
        return self._layers[layer](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            position_embeddings=(cos[:, start:end], sin[:, start:end]),
        )

    @property
    def packs_batches(self) -> bool:
        """Whether batch_pass runs a batch's projections over its real positions only (every
        layer on the compact fast forward); else over every padded slot."""
        return self.kernels is not None and all(self.kernels.layer(i) is not None for i in range(self.num_layers))

    def batch_pass(self, hidden: torch.Tensor, starts: list[int], cache, lengths: list[int] | None = None) -> torch.Tensor:
        """Every layer over a batch's pending blocks in one pass (batch.py): hidden [B, W, H], row
        b's positions starts[b]..starts[b]+W-1, its keys written at those slots of `cache` (a
        batch.BatchKVCache). Positions past a row's real block are padding: they see only their own
        row's earlier keys, and no real position sees them. Returns the final states [B, W, H].

        lengths: each row's real block (the rest of its W slots is padding). Where the layers run
        on the fast forward (`packs_batches`), the norms, projections and MLP then run over the
        real positions only, packed: a row with 5 drafts does not make the other rows' pass 6
        positions wide. Padding slots of the result are zeros there."""
        rows, width = hidden.shape[:2]
        if len(starts) != rows:
            raise ValueError(f"{len(starts)} starts for {rows} rows")
        packed = None
        if lengths is not None and sum(lengths) < rows * width and self.packs_batches:
            if len(lengths) != rows or not all(1 <= n <= width for n in lengths):
                raise ValueError(f"each of {rows} rows needs a real block of 1..{width} positions, got {list(lengths)}")
            packed = to_device([b * width + i for b, n in enumerate(lengths) for i in range(n)], self.device)
            hidden = hidden.reshape(rows * width, -1).index_select(0, packed)[None]
        positions = to_device(list(starts), self.device)[:, None] + torch.arange(width, device=self.device)[None]
        end = max(starts) + width
        cache.begin(starts, width)
        tables, masks = {}, {}
        for layer in range(self.num_layers):
            layer_type, window = self._layer_types[layer], self._windows[layer]
            if layer_type not in tables:
                cos, sin = self._rope_table(layer_type, end)
                tables[layer_type] = (cos[0][positions], sin[0][positions])
            if window not in masks:
                masks[window] = self._batch_mask(positions, end, window)
            fast = None if self.kernels is None else self.kernels.layer(layer)
            if fast is not None:
                hidden = fast(hidden, masks[window], tables[layer_type], cache, packed)
            else:
                hidden = self._layers[layer](
                    hidden,
                    attention_mask=masks[window],
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    position_embeddings=tables[layer_type],
                )
        if packed is not None:
            return hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy_(0, packed, hidden[0]).view(rows, width, -1)
        return hidden

    def _batch_mask(self, positions: torch.Tensor, end: int, window: int | None) -> torch.Tensor:
        """[B, 1, W, end]: query (b, i) at positions[b, i] sees its row's keys 0..positions[b, i]
        (inside the window)."""
        q = positions[:, :, None]
        kv = torch.arange(end, device=self.device)[None, None, :]
        allowed = kv <= q
        if window is not None:
            allowed = allowed & (kv > q - window)
        if self._sdpa:
            return allowed[:, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    def embed_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, W] on the device -> hidden [B, W, H]."""
        return self._embed(token_ids)

    def rows_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head over any rows of final states: [..., H] -> [..., V]."""
        return self._head(self._norm(hidden))

    def layer_states(self, token_ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Teacher-forced pass over a whole sequence through the same layer path as decoding.

        Returns the hidden state after each layer l = 1..L ([k, H] each, before the final norm)
        and the full model's logits [k, V]."""
        cache = self.new_cache(len(token_ids))
        hidden = self.embed(list(token_ids))
        states = []
        for layer in range(self.num_layers):
            hidden = self.run_layer(layer, hidden, 0, cache)
            states.append(hidden[0])
        return states, self.final_logits(hidden)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm, as the model applies it before the LM head."""
        return self._norm(hidden)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._lm_head.weight

    @property
    def softcap(self) -> float | None:
        return self._softcap

    def _head(self, normed: torch.Tensor) -> torch.Tensor:
        packed = None if self.kernels is None else self.kernels.head
        logits = self._lm_head(normed) if packed is None else packed(normed)
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own head: final norm, LM head, soft-capping. hidden [1, k, H] -> [k, V]."""
        return self.rows_logits(hidden)[0]

    def exit_logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Draft logits at check layer `layer` (1-based): the model's own head, or a fitted exit
        head (see exit_head.py). Column i stands for token `exit_token(i)`."""
        if self._exit_head is not None:
            return self._exit_head(hidden, layer)
        return self.final_logits(hidden)

    def exit_token(self, index: int) -> int:
        return index if self._exit_tokens is None else self._exit_tokens[index]

    def next_token_draft(self, final_hidden: torch.Tensor, embedded: torch.Tensor) -> int:
        """The fitted next-token head's draft (exit_head.py): final_hidden [1, 1, H], the last
        verified position's final state (before the final norm), and embedded [1, 1, H], the
        input embedding of the token it predicted -> the token id drafted after that token. One
        host read."""
        return self.next_token_drafts(final_hidden.reshape(-1, final_hidden.shape[-1])[-1:], embedded[0, -1:])[0]

    def next_token_drafts(self, final_hidden: torch.Tensor, embedded: torch.Tensor) -> list[int]:
        """The next-token head's drafts for n sequences at once (a batch's rows): final_hidden
        [n, H] and embedded [n, H], as next_token_draft takes them a row each -> n token ids, in
        one product over the head's weights and one host read."""
        if not self.has_next_token_head:
            raise ValueError("this model's exit head holds no fitted next-token head")
        logits = self._exit_head.next_logits(self._norm(final_hidden), embedded)
        return [self.exit_token(int(i)) for i in read(logits.argmax(-1))]


def sdpa_skips_mask(start: int, k: int, window: int | None) -> bool:
    """Whether generate() passes no mask to SDPA for k queries at positions start.. (no padding):
    transformers' rule in masking_utils._ignore_causal_mask_sdpa, for a cache of start keys."""
    kv_length = start + k
    if window is not None and kv_length >= window:
        return False
    return k == 1 or kv_length == k


def _rope_types(config) -> list[str]:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" not in params:  # per layer type (Gemma3)
        return [str(p.get("rope_type", "default")) for p in params.values() if isinstance(p, dict)]
    return [str(params.get("rope_type", "default"))] if isinstance(params, dict) else []

"""Fast kernels for the decode loop's passes: the modules' own maths on weights prepacked once.

On a CPU, a pass over 1-13 positions is bound by reading the weights, yet `F.linear` re-reads
the LM head almost in full for every extra row (SmolLM2: 11 ms for one row, 35 for three), and
the layers' projections cost about twice their memory floor. oneDNN's linear on a weight
prepacked once reads each weight once per pass, whatever the row count. This module holds those
prepacked copies and the compact layer forward that uses them; the adapter calls it.

- Only modules of exactly the architecture's own types qualify: plain `nn.Linear` projections
  (no PEFT or quantization wrappers), the architecture's own decoder layer, norms and MLP, no
  hooks on any of them, fp32 weights on the CPU. Anything else runs the module's own forward.
- The compact forward (`FastDecoderLayer`) is the Llama family's: projections fused from the same
  weights (q/k/v, gate/up), the layer's own norms, q/k norms (Qwen3), the modeling module's own
  `apply_rotary_pos_emb` and transformers' own attention function for the model's attention
  implementation (masks and sliding windows come from the adapter, as for the module). Gemma3's
  layers keep their own forward.
- The copies belong to a `Kernels` object (one per SpecBound); the user's model is not touched.
  `refresh()` rebuilds them when a weight changes (replaced, or edited in place) or a hook appears.
- The path is chosen by measurement on this machine (`choose`): "auto" times both paths over a
  decoding-sized pass and keeps the prepacked one where it is clearly faster (`keep_prepacked`); "eager" opts out; "onednn" insists.

Same maths, other rounding: logits differ from `F.linear`'s in the last bits, as a verification
pass over k rows already differs from generate()'s one-row steps. Greedy identity with generate()
is measured, not assumed (README, "Kernels").
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "onednn", "eager")
PACK_ROWS = 8  # the row count oneDNN lays prepacked weights out for (decode passes: 1-13 rows)

# The decoder layers the compact forward reproduces, by model_type: (layer class, q/k norms).
_FAST_LAYERS = {
    "llama": ("LlamaDecoderLayer", False),
    "mistral": ("MistralDecoderLayer", False),
    "qwen2": ("Qwen2DecoderLayer", False),
    "qwen3": ("Qwen3DecoderLayer", True),
}


MIN_SAVING = 0.10  # "auto" keeps the prepacked copies only where they save this share of the products' time
MIN_SAVING_S = 0.0005  # ... and at least this much per 1- and 4-row pass pair (below it, timing noise decides)


def keep_prepacked(onednn_s: float, eager_s: float) -> bool:
    """Whether "auto" keeps the prepacked path, given the measured products of both paths: only
    where they are clearly faster. A near tie goes to eager: the copies cost the weights' size
    again in memory, and a choice that noise flips would also flip what the cost cache is keyed
    by (so a rerun would measure costs afresh and tune another artifact)."""
    saved = eager_s - onednn_s
    return saved >= MIN_SAVING * eager_s and saved >= MIN_SAVING_S


def onednn_missing() -> str | None:
    """Why oneDNN's prepacked linear cannot run here, or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not (hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "this torch build lacks mkldnn._linear_pointwise or _reorder_linear_weight"
    return None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._forward_hooks_with_kwargs)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def plain_linear(module: nn.Module) -> bool:
    """A module the prepacked path may stand in for: exactly nn.Linear, unhooked, fp32 on the CPU."""
    return (
        type(module) is nn.Linear
        and not _hooked(module)
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    )


class PackedLinear:
    """One or more nn.Linear reading the same input, as one prepacked oneDNN product."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self._sources = [(m, m.weight, m.weight._version, None if m.bias is None else m.bias._version) for m in linears]
        weight = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
        else:
            bias = None
        self.in_features = linears[0].in_features
        self.out_features = int(weight.shape[0])
        self.splits = [m.out_features for m in linears]
        # oneDNN's blocked layout for a few rows: measured on a 2-core EPYC over 30 layers' fused
        # weights, 23-27 ms for 1-8 rows against 30-46 ms for the plain layout (to_mkldnn)
        self._weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
        self._bias = None if bias is None else bias.contiguous()
        self.nbytes = weight.numel() * weight.element_size() + (0 if bias is None else bias.numel() * bias.element_size())

    def stale(self) -> bool:
        """Whether a source weight was replaced or changed in place, or a hook was added."""
        for module, weight, version, bias_version in self._sources:
            if module.weight is not weight or weight._version != version or _hooked(module):
                return True
            if (None if module.bias is None else module.bias._version) != bias_version:
                return True
        return False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self._weight, self._bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def fast_layer_for(layer: nn.Module, model_type: str, attn_implementation: str):
    """A FastDecoderLayer for `layer`, or None when it must run its own forward (and why)."""
    spec = _FAST_LAYERS.get(model_type)
    if spec is None:
        return None, f"no compact forward for {model_type}"
    class_name, qk_norm = spec
    if type(layer).__name__ != class_name:
        return None, f"layer is a {type(layer).__name__}, not {class_name}"
    home = type(layer).__module__
    if any(_hooked(m) for m in layer.modules()):
        return None, "a hook is registered on the layer"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(plain_linear(getattr(attn, n, None)) for n in names):
        return None, "attention projections are not plain nn.Linear"
    if not all(plain_linear(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")):
        return None, "MLP projections are not plain nn.Linear"
    own = [layer.input_layernorm, layer.post_attention_layernorm, attn, mlp] + ([attn.q_norm, attn.k_norm] if qk_norm else [])
    if any(type(m).__module__ != home for m in own):
        return None, "a norm, attention or MLP module is not the architecture's own"
    if attn.training:
        return None, "the layer is in training mode"
    return FastDecoderLayer(layer, qk_norm, attn_implementation), None


def _own_products(layer: nn.Module, x: torch.Tensor) -> None:
    """A Llama-family layer's weight products through its own modules (what the measurement times)."""
    a, m = layer.self_attn, layer.mlp
    a.q_proj(x), a.k_proj(x), a.v_proj(x), a.o_proj(x)
    m.down_proj(m.gate_proj(x) * m.up_proj(x))


class FastDecoderLayer:
    """A Llama-family decoder layer's forward over prepacked, fused projections."""

    def __init__(self, layer: nn.Module, qk_norm: bool, attn_implementation: str) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn, self.mlp = layer, attn, mlp
        self.qk_norm = qk_norm
        self.head_dim = int(attn.head_dim)
        self.qkv = PackedLinear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = PackedLinear([attn.o_proj])
        self.gate_up = PackedLinear([mlp.gate_proj, mlp.up_proj])
        self.down = PackedLinear([mlp.down_proj])
        self.rope = sys.modules[type(layer).__module__].apply_rotary_pos_emb
        if attn_implementation == "eager":
            self.attention = sys.modules[type(layer).__module__].eager_attention_forward
        else:
            self.attention = ALL_ATTENTION_FUNCTIONS[attn_implementation]
        window = getattr(attn, "sliding_window", None)
        self.attention_kwargs = {"sliding_window": window} if hasattr(attn, "sliding_window") else {}
        # grouped-query attention under a mask (a verification pass over several positions), SDPA
        # reading the shared keys in place; the mask carries any sliding window
        self.masked_gqa = attn_implementation == "sdpa" and getattr(attn, "num_key_value_groups", 1) > 1

    @property
    def parts(self) -> tuple[PackedLinear, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)

    def __call__(self, hidden, attention_mask, position_embeddings, cache, packed: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, W, H] -> [B, W, H]. packed: a batch pass without padding (adapter.batch_pass):
        hidden is then [1, T, H], the T real positions of a pass laid out as [B, W] slots, and
        `packed` [T] holds each one's flat slot index. The norms, projections and MLP run over
        the T positions; RoPE, the cache and attention over the slots (padding slots hold zeros:
        later positions than any real one of their row, so causality hides them)."""
        layer, attn = self.layer, self.attn
        residual = hidden
        x = layer.input_layernorm(hidden)
        qkv = self.qkv(x)
        if packed is not None:
            rows, width = position_embeddings[0].shape[:2]
            qkv = qkv.new_zeros(rows * width, qkv.shape[-1]).index_copy_(0, packed, qkv[0]).view(rows, width, -1)
        shape = (*qkv.shape[:-1], -1, self.head_dim)
        q, k, v = qkv.split(self.qkv.splits, dim=-1)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.rope(q, k, cos, sin)
        k, v = cache.update(k, v, attn.layer_idx)
        if self.masked_gqa and attention_mask is not None and (q.shape[2] > 1 or q.shape[0] > 1):
            # transformers' SDPA path repeats every cached key and value per query group when a
            # mask is given (a copy of the whole cache, per layer and pass, that grows with the
            # context); SDPA's own grouped attention reads them in place: the same products. A batch
            # (batch.py) is masked even for one query a row, so it takes this path too
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scaling, enable_gqa=True)
            out = out.transpose(1, 2)
        else:
            out, _ = self.attention(
                attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **self.attention_kwargs
            )
        out = out.reshape(*qkv.shape[:-1], -1)
        if packed is not None:
            out = out.reshape(-1, out.shape[-1]).index_select(0, packed)[None]
        hidden = residual + self.o(out.contiguous())
        residual = hidden
        x = layer.post_attention_layernorm(hidden)
        gate, up = self.gate_up(x).split(self.gate_up.splits, dim=-1)
        return residual + self.down(self.mlp.act_fn(gate) * up)


@dataclass(frozen=True)
class KernelReport:
    """What a Kernels object runs and what it cost to set up, for statistics and `costs`."""

    path: str  # "onednn" or "eager"
    requested: str  # "auto", "onednn" or "eager"
    reason: str  # why this path (the measurement, or why the fast path cannot run)
    fast_layers: int  # decoder layers on the compact forward
    num_layers: int
    fast_head: bool
    extra_bytes: int  # memory held by prepacked copies
    setup_s: float  # one-time cost: prepacking and the measurement

    def describe(self) -> str:
        if self.path == "eager":
            return f"kernels: eager ({self.reason})"
        return (
            f"kernels: onednn, {self.fast_layers}/{self.num_layers} layers and "
            f"{'the' if self.fast_head else 'not the'} LM head prepacked, {self.extra_bytes / 2**20:.0f} MiB extra, "
            f"set up in {self.setup_s:.2f} s ({self.reason})"
        )


class Kernels:
    """The fast copies of one model's weights, and which path each part of a pass takes.

    Build with `Kernels.build(model, mode)`. `layer(i)` is a FastDecoderLayer or None (run the
    module), `head` a PackedLinear or None (run the LM head module)."""

    def __init__(self, model: nn.Module, mode: str = "auto") -> None:
        if mode not in KERNEL_MODES:
            raise UsageError(f"unknown kernels {mode!r}; use one of {', '.join(KERNEL_MODES)}")
        self.model = model
        self.mode = mode
        self._layers: list[FastDecoderLayer | None] = []
        self.head: PackedLinear | None = None
        self.report = KernelReport("eager", mode, "not built", 0, 0, False, 0, 0.0)
        self._build()

    def _build(self) -> None:
        t0 = time.perf_counter()
        body = self.model.model
        n = len(body.layers)
        why = self._why_not()
        if why is not None:
            self._layers, self.head = [None] * n, None
            if self.mode == "onednn":
                log.warning("kernels='onednn' asked for, but %s; running eager", why)
            self.report = KernelReport("eager", self.mode, why, 0, n, False, 0, 0.0)
            return
        config = self.model.config
        attention = getattr(config, "_attn_implementation", None) or "eager"
        layers, reasons = [], set()
        for layer in body.layers:
            fast, reason = fast_layer_for(layer, str(config.model_type), attention)
            layers.append(fast)
            if reason:
                reasons.add(reason)
        head = PackedLinear([self.model.lm_head]) if plain_linear(self.model.lm_head) else None
        self._layers, self.head = layers, head
        reason = "asked for" if self.mode == "onednn" else "measured faster here"
        if self.mode == "auto":
            faster, reason = self._measure()
            if not faster:
                self._layers, self.head = [None] * n, None
                self.report = KernelReport("eager", self.mode, reason, 0, n, False, 0, time.perf_counter() - t0)
                return
        if reasons:
            reason += "; own forward where " + "; ".join(sorted(reasons))
        extra = sum(p.nbytes for f in layers if f is not None for p in f.parts) + (head.nbytes if head else 0)
        fast_layers = sum(f is not None for f in layers)
        self.report = KernelReport("onednn", self.mode, reason, fast_layers, n, head is not None, extra, time.perf_counter() - t0)

    def _why_not(self) -> str | None:
        if self.mode == "eager":
            return "asked for"
        missing = onednn_missing()
        if missing:
            return missing
        if _global_hooks():
            return "global module hooks are registered"
        parameter = next(self.model.parameters())
        if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            return f"prepacked kernels serve fp32 on the CPU, the model is {str(parameter.dtype).removeprefix('torch.')} on {parameter.device.type}"
        if self.model.training:
            return "the model is in training mode (dropout)"
        return None

    def _measure(self) -> tuple[bool, str]:
        """Time the projections of every layer and the LM head over 1 and 4 rows, both ways."""
        body = self.model.model
        hidden = int(self.model.config.hidden_size)

        def eager(x):
            for layer in body.layers:
                _own_products(layer, x)
            self.model.lm_head(x)

        def fast(x):
            for f, layer in zip(self._layers, body.layers):
                if f is None:
                    _own_products(layer, x)
                else:
                    f.qkv(x), f.o(x)
                    g, u = f.gate_up(x).split(f.gate_up.splits, dim=-1)
                    f.down(g * u)
            (self.head or self.model.lm_head)(x)

        totals = {"eager": 0.0, "onednn": 0.0}
        with torch.inference_mode():
            for rows in (1, 4):
                x = torch.randn(1, rows, hidden)
                for name, fn in (("eager", eager), ("onednn", fast)):
                    fn(x)  # warm-up
                for _ in range(3):
                    for name, fn in (("eager", eager), ("onednn", fast)):
                        t = time.perf_counter()
                        fn(x)
                        totals[name] += time.perf_counter() - t
        faster = keep_prepacked(totals["onednn"] / 3, totals["eager"] / 3)
        text = f"weight products of a 1- and a 4-row pass: onednn {totals['onednn'] * 1e3 / 3:.1f} ms, eager {totals['eager'] * 1e3 / 3:.1f} ms"
        return faster, ("measured faster here: " if faster else "eager: prepacked not clearly faster here (10% and 0.5 ms a pass): ") + text

    @property
    def path(self) -> str:
        return self.report.path

    def layer(self, index: int) -> FastDecoderLayer | None:
        return self._layers[index] if self._layers else None

    def refresh(self) -> bool:
        """Rebuild the copies if a weight changed or a hook appeared since they were made; True if rebuilt."""
        if self.report.path == "eager":
            return False
        parts = [p for f in self._layers if f is not None for p in f.parts] + ([self.head] if self.head else [])
        changed = _global_hooks() or any(p.stale() for p in parts)
        if not changed and not any(f is not None and any(_hooked(m) for m in f.layer.modules()) for f in self._layers):
            return False
        log.info("the model's weights or hooks changed: rebuilding the prepacked kernels")
        self._build()
        return True

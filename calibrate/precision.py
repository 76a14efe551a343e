"""The precision at which calibration decides, so that its artifact does not depend on timing,
thread counts, the order of float sums or which worker computed what.

Three rules, each applied where a value is made, before anything uses it:

1. Lens moments are exact. The normalised states entering the ridge lens are rounded to
   multiples of 2^-STATE_BITS (|x| <= STATE_LIMIT, clipped beyond: the models measured stay
   under 60), so every product is an integer times 2^-2*STATE_BITS; moments are summed in blocks
   small enough for float64 to hold every partial sum exactly, then in int64. Any order, any
   thread count, any split into shards gives the same bits (up to 2^23 recorded positions).
2. Recorded statistics and fitted values carry STAT_BITS significant bits (relative precision
   2^-16, about 1.5e-5): the confidences on the temperature grid, the fitted temperatures and
   alpha, and the lens weights. A difference of d (relative) survives the rounding only for a
   value within d of a rounding boundary, so with probability about d / 2^-16 per value: nil
   for the float64 fits (a BLAS kernel's summation order is ~1e-15), but about 2^-8 per value
   for a float32 confidence that moved by its last bit.
3. Tuning compares simulated results at 6 decimals (SimResult.to_dict), ties broken by the
   lower trial index.

What the rules do not cover by themselves: the model's own forward pass. In the model's dtype its
bits follow the CPU's kernels (AVX2 and AVX-512 machines sum in other orders), and a state that
moves by its last float32 bit crosses a rounding boundary with probability about 2^-13 per value,
so a job over thousands of positions fits other next-head bytes on another CPU kind. Rule 4:

4. With `record_dtype = "float64"` (RECORD_DTYPES), everything a record or a moment is computed
   from runs in float64 on a copy of the model: the model's own answers, both passes, the folded
   heads and the confidences. Kernels then disagree near 2^-52, so a rounding boundary is crossed
   with probability about 2^-39 per value and the artifact is the same on any CPU (with a pinned
   cost model), at about twice the collection time. CI checks that run on runners of mixed CPU
   kinds want it. Without it, `specbound calibrate --check` says which fields moved and by how
   much.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

STATE_BITS = 10
STATE_LIMIT = 1024.0
STAT_BITS = 16
RECORD_DTYPES = ("float64",)  # a job's [collect] record_dtype; absent: the model's own dtype
_BLOCK_ROWS = 512  # 512 products of at most 2^40 each: partial sums below 2^49, exact in float64


def round_bits(values, bits: int = STAT_BITS):
    """Round to `bits` significant bits (ties to even), keeping the dtype. Zero, inf and NaN stay."""
    a = np.asarray(values)
    mantissa, exponent = np.frexp(a.astype(np.float64))
    out = np.ldexp(np.rint(mantissa * 2.0**bits) / 2.0**bits, exponent).astype(a.dtype)
    return out if isinstance(values, np.ndarray) or np.ndim(values) else out.item()


def quantize_states(x: np.ndarray) -> np.ndarray:
    """States as integers in units of 2^-STATE_BITS (held in float64, where they are exact)."""
    scale = 2.0**STATE_BITS
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * scale), -STATE_LIMIT * scale, STATE_LIMIT * scale)


def exact_moments(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[x 1]^T [x 1] and [x 1]^T y of quantized states, as int64 in units of 2^-2*STATE_BITS."""
    xq, yq = quantize_states(x), quantize_states(y)
    x1 = np.concatenate([xq, np.full((len(xq), 1), 2.0**STATE_BITS)], axis=1)
    gram = np.zeros((x1.shape[1], x1.shape[1]), dtype=np.int64)
    cross = np.zeros((x1.shape[1], yq.shape[1]), dtype=np.int64)
    for start in range(0, len(x1), _BLOCK_ROWS):
        block = x1[start : start + _BLOCK_ROWS]
        gram += (block.T @ block).astype(np.int64)
        cross += (block.T @ yq[start : start + _BLOCK_ROWS]).astype(np.int64)
    return gram, cross


def moments_as_float(moments: np.ndarray) -> np.ndarray:
    return moments.astype(np.float64) / 2.0 ** (2 * STATE_BITS)


def recording_model(model: torch.nn.Module, record_dtype: str | None) -> torch.nn.Module:
    """The model calibration records with (rule 4): `model` itself, or a float64 copy of it that
    this run owns (the caller's model is never converted)."""
    if record_dtype is None:
        return model
    if record_dtype not in RECORD_DTYPES:
        raise ValueError(f"record_dtype must be one of {RECORD_DTYPES}, got {record_dtype!r}")
    return copy.deepcopy(model).to(torch.float64).eval()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where a record's derived values (folded heads, softmaxes) are computed: float32 at least,
    float64 for a float64 recording."""
    return torch.promote_types(dtype, torch.float32)

"""SpecBound runtime: lossless self-speculative decoding with calibrated early exits.

    import specbound_runtime as sb
    m = sb.load("smollm2-135m", artifact="artifacts/smollm2-135m.safetensors")
    ids = m.generate(input_ids, max_new_tokens=128)

Imports nothing from optuna, scikit-learn or datasets: a deployment installs the runtime alone.
`load`, `SpecBound` and `Generated` are imported on first use (PEP 562), so importing a submodule
such as `specbound_runtime.errors` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["Generated", "SpecBound", "load", "SpecBoundError"]


def __getattr__(name):
    if name in ("Generated", "SpecBound", "load"):
        from . import api

        return getattr(api, name)
    if name == "SpecBoundError":
        from .errors import SpecBoundError

        return SpecBoundError
    raise AttributeError(f"module 'specbound_runtime' has no attribute {name!r}")

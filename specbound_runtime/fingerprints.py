"""What exactly a model and a tokenizer are: hashes that an artifact records and checks.

An artifact is fitted for one model; loading it for another must fail, naming both. The
fingerprint covers the architecture summary, the config (minus keys that only say how or where
it was loaded) and every weight's bytes; the tokenizer's covers its vocabulary, special tokens
and chat template.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .errors import ArtifactError

# Keys of config.to_dict() that say how or where a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_model_name_or_path",
        "name_or_path",
        "_commit_hash",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "attn_implementation",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_cache",
    }
)

HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- identity --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFingerprint:
    """What a model is: architecture summary plus hashes of its config and of every weight."""

    model_type: str
    num_layers: int
    vocab_size: int
    hidden_size: int
    config_sha256: str
    weights_sha256: str  # the weights as loaded, bit for bit
    # The same weights rounded to bfloat16: equal for one checkpoint loaded in float32, bfloat16
    # or (almost always) float16, so an artifact fitted in one precision serves the others.
    weights_bf16_sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ValueError(f"model_type must be a non-empty string, got {self.model_type!r}")
        for name in ("num_layers", "vocab_size", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("config_sha256", "weights_sha256", "weights_bf16_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or not HEX64.match(value):
                raise ValueError(f"{name} must be 64 lowercase hex digits, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        """Inverse of to_dict. Malformed input (e.g. from a damaged artifact) raises ArtifactError."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise ArtifactError(f"model fingerprint must be a JSON object, got {type(data).__name__}; refit the artifact")
        missing = [n for n in names if n not in data]
        if missing:
            raise ArtifactError(f"model fingerprint lacks {', '.join(missing)}; refit the artifact")
        try:
            return cls(**{n: data[n] for n in names})
        except ValueError as exc:
            raise ArtifactError(f"malformed model fingerprint ({exc}); refit the artifact") from exc

    def same_model(self, other: "ModelFingerprint") -> bool:
        """The same checkpoint, in this precision or another (see weights_bf16_sha256)."""
        shape = ("model_type", "num_layers", "vocab_size", "hidden_size", "config_sha256")
        if any(getattr(self, n) != getattr(other, n) for n in shape):
            return False
        return self.weights_sha256 == other.weights_sha256 or self.weights_bf16_sha256 == other.weights_bf16_sha256

    def short(self) -> str:
        """A short readable form, e.g. 'llama L=30 V=49152 w=1a2b3c4d'."""
        return f"{self.model_type} L={self.num_layers} V={self.vocab_size} w={self.weights_sha256[:8]}"


def _config_sha256(config_dict: dict[str, Any]) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    text = json.dumps(clean(config_dict), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _weights_sha256(state_dict: dict[str, torch.Tensor], as_dtype: torch.dtype | None = None) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order; with
    `as_dtype`, of every floating tensor cast to that dtype first."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        if as_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(as_dtype)
        header = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n"
        digest.update(header.encode())
        if tensor.numel():
            raw = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()


def fingerprint_model(model: torch.nn.Module) -> ModelFingerprint:
    """Fingerprint a loaded transformers model (about 0.5 s for 135M fp32 parameters)."""
    config = model.config
    return ModelFingerprint(
        model_type=str(config.model_type),
        num_layers=int(config.num_hidden_layers),
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        config_sha256=_config_sha256(config.to_dict()),
        weights_sha256=_weights_sha256(model.state_dict()),
        weights_bf16_sha256=_weights_sha256(model.state_dict(), torch.bfloat16),
    )


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """sha256 of the sorted vocabulary, the special tokens and the chat template.

    Merges and normalisation rules are not included: two tokenizers with the same vocabulary and
    special tokens but different BPE merges get the same fingerprint.
    """
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": special,
        "all_special_tokens": sorted(str(t) for t in tokenizer.all_special_tokens),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()

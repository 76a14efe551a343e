"""The artifact: one safetensors file with the calibrated policy, the exit head, and metadata.

This module is the only one that opens an artifact file. Artifacts are data: tensors and string
metadata, parsed with json and checked field by field; nothing in them is ever executed or
evaluated. The file is written by hand in the safetensors layout with sorted keys, because the
safetensors writer orders its metadata map differently from run to run, and an artifact must be
byte-identical for the same inputs and seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ArtifactError
from .exit_head import ExitHeadWeights
from .files import atomic_write_bytes
from .fingerprints import HEX64, ModelFingerprint, TokenizerFingerprint
from .policy import ExitPolicy, storage

# 2: a policy may have no check layers (lookup only, or no drafting). 3: fingerprints name what the
# model computes (allow-listed config values, weights) and what the tokenizer does, field by field.
SCHEMA_VERSION = 3
KIND = "specbound-artifact"

_DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.float64: "F64", torch.int32: "I32"}


@dataclass(frozen=True)
class Artifact:
    policy: ExitPolicy
    exit_weights: ExitHeadWeights | None
    metadata: dict[str, str] = field(default_factory=dict)

    def meta_json(self, key: str):
        value = self.metadata.get(key)
        return None if value is None else json.loads(value)


def _policy_tensors(policy: ExitPolicy) -> dict[str, torch.Tensor]:
    """The policy as tensors, laid out as its fields say (`policy.storage`). A sparse field is
    written only when it differs from its default: an artifact without it is byte for byte what it
    was before the field existed."""
    tensors = {}
    for s in storage():
        values = [getattr(policy, name) for name in s.fields]
        if s.sparse and all(v == ExitPolicy.__dataclass_fields__[name].default for v, name in zip(values, s.fields)):
            continue
        flat = list(values[0]) if s.kind == "vector" else [int(v) for v in values] if s.kind == "flag" else values
        tensors[f"policy.{s.tensor}"] = torch.tensor(flat, dtype=getattr(torch, s.dtype))
    return tensors


def _policy_fields(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """The policy's fields from its tensors (`policy.storage`), each checked for kind and size; a
    field whose tensor an older artifact lacks is left to its default."""
    fields = {}
    for s in storage():
        name = f"policy.{s.tensor}"
        if name not in tensors and not s.required:
            continue
        t = _require(tensors, name, 1, "float" if s.dtype.startswith("float") else "int", path)
        if s.kind == "vector":
            fields[s.fields[0]] = tuple(t.tolist())
            continue
        if t.numel() != len(s.fields) or s.kind == "flag" and int(t[0]) not in (0, 1):
            wanted = f"[{', '.join(s.fields)}]" if s.packed else "one value, 0 or 1" if s.kind == "flag" else "one value"
            raise ArtifactError(f"{path}: {name} must hold {wanted}, got {t.numel()} values {t.tolist()}")
        fields.update((n, bool(v) if s.kind == "flag" else v) for n, v in zip(s.fields, t.tolist()))
    return fields


def _checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(metadata):
        if k != "checksum":
            h.update(f"{k}={metadata[k]}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{_DTYPES[t.dtype]}:{list(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def save_artifact(path: str | Path, artifact: Artifact, force: bool = False) -> Path:
    """Write atomically (temporary file, then rename). Refuses to replace a file unless force."""
    path = Path(path)
    if path.exists() and not force:
        raise ArtifactError(f"{path} already exists; pass --force to replace it or choose another --out")
    tensors = _policy_tensors(artifact.policy)
    if artifact.exit_weights is not None:
        if artifact.exit_weights.shortlist is not None:
            tensors["head.shortlist"] = artifact.exit_weights.shortlist.to(torch.int64)
        for layer, (w, b) in sorted(artifact.exit_weights.lens.items()):
            tensors[f"lens.{layer}.weight"] = w.to(torch.float32)
            tensors[f"lens.{layer}.bias"] = b.to(torch.float32)
        if artifact.exit_weights.next_head is not None:
            w, b = artifact.exit_weights.next_head
            tensors["next_head.weight"] = w.to(torch.float32)
            tensors["next_head.bias"] = b.to(torch.float32)
    if "head" in artifact.policy.sources and (artifact.exit_weights is None or artifact.exit_weights.next_head is None):
        raise ArtifactError("the policy drafts with the fitted next-token head, but the artifact would hold none")
    metadata = {k: str(v) for k, v in artifact.metadata.items()}
    metadata["kind"] = KIND
    metadata["schema_version"] = str(SCHEMA_VERSION)
    metadata["checksum"] = _checksum(metadata, tensors)
    blob = _serialize(tensors, metadata)
    try:
        atomic_write_bytes(path, blob)
    except OSError as e:  # a full disk is not a bug: say so, and that nothing changed
        raise ArtifactError(
            f"cannot write {path} ({e.strerror or e}); nothing was written there; free disk space or choose another --out"
        ) from None
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read the file with safetensors (which never unpickles), saying what is wrong in the user's
    terms: any inconsistency is a corrupt file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    if not path.exists():
        raise ArtifactError(f"no artifact at {path}; run `specbound calibrate` to make one")
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not an artifact file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {path} ({e.strerror or e}); check its permissions") from None
    bad = f"{path} is not a valid SpecBound artifact"
    if len(data) < 8:
        raise ArtifactError(f"{bad}: file is too short; recalibrate or restore it")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 100_000_000:
        raise ArtifactError(f"{bad}: header claims {n} bytes, the file holds {len(data) - 8}; it is truncated or corrupt")
    try:
        tensors = load(data)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as e:
        message = str(e)
        if "JSON" in message or "header" in message.lower() and "length" not in message:
            raise ArtifactError(f"{bad}: unreadable header ({message.split(': ', 1)[-1]}); it is corrupt") from None
        raise ArtifactError(f"{bad}: {message.split(': ', 1)[-1]}; it is truncated or corrupt") from None
    return metadata, tensors


def _require(tensors, name, ndim, dtype_kind, path):
    t = tensors.get(name)
    if t is None:
        raise ArtifactError(f"{path}: required tensor {name!r} is missing; recalibrate")
    if t.ndim != ndim:
        raise ArtifactError(f"{path}: tensor {name!r} must be {ndim}-D, got shape {list(t.shape)}")
    if dtype_kind == "int" and t.dtype not in (torch.int64, torch.int32):
        raise ArtifactError(f"{path}: tensor {name!r} must hold integers, got {t.dtype}")
    if dtype_kind == "float":
        if not t.dtype.is_floating_point:
            raise ArtifactError(f"{path}: tensor {name!r} must hold floats, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{path}: tensor {name!r} contains NaN or Inf; recalibrate")
    return t


def read_artifact(path: str | Path) -> Artifact:
    """Read and validate an artifact without a model (for `inspect`)."""
    path = Path(path)
    metadata, tensors = _read(path)
    if metadata.get("kind") != KIND:
        raise ArtifactError(f"{path} is a safetensors file but not a SpecBound artifact (no kind={KIND})")
    try:
        version = int(metadata.get("schema_version", ""))
    except ValueError:
        raise ArtifactError(f"{path}: schema_version is missing or not an integer") from None
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has artifact schema v{version}, newer than this SpecBound reads (v{SCHEMA_VERSION}); "
            "upgrade specbound or recalibrate with this version"
        )
    if metadata.get("checksum") != _checksum(metadata, tensors):
        raise ArtifactError(f"{path}: checksum mismatch, the file was altered or corrupted; recalibrate or restore it")
    try:
        num_layers = int(json.loads(metadata["model_fingerprint"])["num_layers"])
    except (KeyError, ValueError, TypeError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: metadata model_fingerprint is missing or malformed; recalibrate") from None
    try:
        policy = ExitPolicy(num_layers=num_layers, **_policy_fields(tensors, path))
    except ValueError as e:
        raise ArtifactError(f"{path}: invalid policy: {e}; recalibrate") from None
    if "decoding_mode" in metadata:  # absent: tuned for greedy decoding
        from .sampling import DecodingMode

        try:
            DecodingMode.from_json(metadata["decoding_mode"])
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{path}: metadata decoding_mode is malformed ({e}); recalibrate") from None
    shortlist = tensors.get("head.shortlist")
    if shortlist is not None:
        shortlist = _require(tensors, "head.shortlist", 1, "int", path)
    lens = {}
    for name in tensors:
        if name.startswith("lens.") and name.endswith(".weight"):
            layer = name.split(".")[1]
            if not layer.isdigit() or not (1 <= int(layer) < num_layers):
                raise ArtifactError(f"{path}: lens layer {layer!r} is outside 1..{num_layers - 1}")
            w = _require(tensors, name, 2, "float", path)
            b = _require(tensors, f"lens.{layer}.bias", 1, "float", path)
            lens[int(layer)] = (w, b)
    next_head = None  # the fitted next-token head: optional, both tensors or neither
    if "next_head.weight" in tensors or "next_head.bias" in tensors:
        next_head = (
            _require(tensors, "next_head.weight", 2, "float", path),
            _require(tensors, "next_head.bias", 1, "float", path),
        )
    if "head" in policy.sources and next_head is None:
        raise ArtifactError(f"{path}: the policy drafts with the fitted next-token head, but the artifact holds none; recalibrate")
    weights = None
    if shortlist is not None or lens or next_head is not None:
        try:
            weights = ExitHeadWeights(shortlist=shortlist, lens=lens, next_head=next_head)
        except ValueError as e:
            raise ArtifactError(f"{path}: invalid exit head: {e}") from None
    return Artifact(policy=policy, exit_weights=weights, metadata=metadata)


def load_artifact(path: str | Path, model_fingerprint, tokenizer_fingerprint=None) -> Artifact:
    """Read an artifact and refuse it unless it was fitted for this model and tokenizer
    (fingerprints.ModelFingerprint, TokenizerFingerprint), naming the first field that differs."""
    artifact = read_artifact(path)
    theirs = artifact.meta_json("model_fingerprint")
    if isinstance(theirs, dict) and "config" not in theirs and "config_sha256" in theirs:
        raise ArtifactError(
            f"{path} was made by an older SpecBound, whose model fingerprint hashed how the model was loaded "
            "along with what it computes; recalibrate for this model"
        )
    mismatch = _fingerprint(path, ModelFingerprint, theirs).mismatch(model_fingerprint)
    if mismatch is None and tokenizer_fingerprint is not None:
        raw = artifact.metadata.get("tokenizer_fingerprint")
        if raw is not None and HEX64.match(raw):
            raise ArtifactError(
                f"{path} was made by an older SpecBound, whose tokenizer fingerprint is one hash; "
                "recalibrate for this tokenizer"
            )
        try:
            their_tok = json.loads(raw) if raw is not None else None
        except json.JSONDecodeError:
            their_tok = raw
        mismatch = _fingerprint(path, TokenizerFingerprint, their_tok).mismatch(tokenizer_fingerprint)
    if mismatch is not None:
        raise ArtifactError(f"{path} was fitted for {mismatch.describe()}; recalibrate for this {mismatch.subject}")
    ours = model_fingerprint.to_dict()
    hidden = ours.get("hidden_size")
    if artifact.exit_weights is not None:
        for layer, (w, b) in artifact.exit_weights.lens.items():
            if hidden is not None and w.shape[0] != hidden:
                raise ArtifactError(f"{path}: lens for layer {layer} is {w.shape[0]}-wide, the model's hidden size is {hidden}")
        nh = artifact.exit_weights.next_head
        if nh is not None and hidden is not None and nh[0].shape[1] != hidden:
            raise ArtifactError(
                f"{path}: the next-token head is {nh[0].shape[1]}-wide, the model's hidden size is {hidden}"
            )
        sl = artifact.exit_weights.shortlist
        if sl is not None and (int(sl.min()) < 0 or int(sl.max()) >= ours.get("vocab_size", 1 << 62)):
            raise ArtifactError(f"{path}: short-list token ids fall outside the model's vocabulary")
    return artifact


def _fingerprint(path, kind, data):
    """An artifact's recorded fingerprint; a damaged one is refused, naming the file."""
    try:
        return kind.from_dict(data)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None

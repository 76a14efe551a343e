"""Runtimes a user might pick instead of SpecBound, as speed references: ONNX Runtime GenAI.

`ort-genai` is ONNX Runtime GenAI's plain greedy decoding and `ort-genai-ngram` the same with its
n-gram speculation (`GeneratorParams.set_speculative_options(ngram_size=3)`, its other settings
left at their defaults), both on an fp32 CPU export of the same checkpoint by its own model
builder (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`). They run other kernels on
the same weights, so they are not token-identical by construction: the bench reports their token
agreement with `generate()` like any method's. The export is made once per checkpoint and cached
(`~/.cache/specbound/peers/`); its time and the load are reported apart from every timed answer.

They need the optional wheels (`pip install 'specbound[peers]'`); without them they are skipped
with one line that says so. OpenVINO GenAI is not a bench method yet: its fp32 export needs
optimum-intel's exporter, which pins transformers < 5.6, so it runs in an environment of its own
(scripts/openvino_export.sh, which OpenVINO GenAI runs in too), and experiments/openvino_peer.py
compares it on a batch bench's prompts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ORT = "ort-genai"
ORT_NGRAM = "ort-genai-ngram"
PEERS = (ORT, ORT_NGRAM)
NGRAM_SIZE = 3  # the n-gram speculation's match length (ONNX Runtime GenAI accepts 2 and up)
INSTALL = "pip install 'specbound[peers]'"


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says why and what to install."""


def ort_missing() -> str | None:
    """Why ONNX Runtime GenAI cannot run here, or None when it can."""
    import importlib.util

    missing = [m for m in ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed ({INSTALL})"
    return None


def hf_folder(source: str) -> Path:
    """The Hugging Face folder a LoadedModel's `source` names (for a GGUF: its converted folder)."""
    folder = Path(source.split(" (from ")[0])
    if not (folder / "config.json").is_file():
        raise PeerUnavailable(f"the model was not read from a Hugging Face folder ({source}); the ONNX export needs one")
    return folder


@dataclass(frozen=True)
class PeerWarmUp:
    export_s: float  # 0 when the cached export was used
    load_s: float
    folder: str

    def to_dict(self) -> dict:
        return {"export_s": round(self.export_s, 3), "load_s": round(self.load_s, 3), "export": self.folder}


class OrtPeer:
    """ONNX Runtime GenAI on an fp32 CPU export; `generate` decodes token ids greedily."""

    def __init__(self, folder: Path, warm_up: PeerWarmUp):
        import onnxruntime_genai as og

        self._og = og
        started = time.perf_counter()
        self.model = og.Model(str(folder))
        self.warm_up = PeerWarmUp(warm_up.export_s, time.perf_counter() - started, str(folder))

    def generate(self, prompt_ids, max_new_tokens: int, ngram: bool) -> list[int]:
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
        if ngram:
            params.set_speculative_options(ngram_size=NGRAM_SIZE)
        generator = og.Generator(self.model, params)
        generator.append_tokens(list(prompt_ids))
        out: list[int] = []
        while not generator.is_done() and len(out) < max_new_tokens:
            generator.generate_next_token()
            out.extend(int(t) for t in generator.get_next_tokens())
        return out[:max_new_tokens]


def export_dir(cache: Path, fingerprint) -> Path:
    return cache / "peers" / f"ort-genai-fp32-cpu-{fingerprint.weights_sha256[:16]}"


def ort_peer(source: str, fingerprint, cache: Path) -> OrtPeer:
    """The export for this checkpoint (made now if not cached) and the model loaded from it."""
    why = ort_missing()
    if why:
        raise PeerUnavailable(why)
    folder = export_dir(cache, fingerprint)
    export_s = 0.0
    if not (folder / "genai_config.json").is_file():
        partial = folder.with_name(folder.name + ".partial")
        started = time.perf_counter()
        command = [
            sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder(source)), "-o", str(partial),
            "-p", "fp32", "-e", "cpu", "-c", str(partial / "cache"),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not (partial / "genai_config.json").is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise PeerUnavailable(f"ONNX Runtime GenAI's model builder failed on this model: {last[:200]}")
        shutil.rmtree(partial / "cache", ignore_errors=True)  # the builder's temporary files
        partial.rename(folder)
        export_s = time.perf_counter() - started
    config = json.loads((folder / "genai_config.json").read_text())
    if config.get("model", {}).get("decoder") is None:
        raise PeerUnavailable(f"{folder} holds no decoder export; delete it and run again")
    peer = OrtPeer(folder, PeerWarmUp(export_s, 0.0, str(folder)))
    try:  # some shapes export but do not run (its attention wants head sizes in multiples of 16)
        peer.generate([1, 2, 3], 2, ngram=False)
    except Exception as exc:  # onnxruntime raises RuntimeError subclasses with the node's message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PeerUnavailable(f"ONNX Runtime GenAI cannot run this model: {first[:200]}") from exc
    return peer

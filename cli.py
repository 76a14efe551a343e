"""The `specbound` command: parse, call, print. Every domain error becomes one `Error: ...` line."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import typer

from specbound_runtime.errors import EXIT_CODES_HELP, EXIT_INTERNAL, EXIT_INTERRUPTED, SpecBoundError, SpecBoundWarning, UsageError

app = typer.Typer(
    help="Lossless self-speculative decoding with calibrated early exits.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    _state["debug"] = debug


def _err(message: str) -> None:
    typer.echo(message, err=True)


@contextlib.contextmanager
def _one_error_path():
    """Turn domain errors into `Error: ...` and an exit code; Ctrl-C into exit 130."""
    if not _state["debug"]:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, timeout, a cancelled job) ends the run like Ctrl-C: cleanly, work kept
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except SpecBoundError as e:
        if _state["debug"]:
            raise
        _err(f"Error: {_redact(str(e))}")
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        _err("Error: interrupted; work already written to disk is kept, rerun to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug, not a user error: say so, keep the traceback behind --debug
        if _state["debug"]:
            raise
        _err(f"Error: internal error ({type(e).__name__}: {_redact(str(e))}); rerun with --debug and report the traceback")
        raise typer.Exit(EXIT_INTERNAL)
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's own warnings as one `warning: ...` line; others as Python shows them."""
    if issubclass(category, SpecBoundWarning):
        _err(f"warning: {message}")
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


# Top-level modules each install extra brings; a ModuleNotFoundError naming one of them means the
# extra is missing, not that SpecBound is broken. tests/test_packaging.py checks this against the
# extra's distributions in pyproject.toml.
EXTRA_MODULES = {
    "calibrate": ("optuna", "sklearn", "datasets", "matplotlib", "scipy", "pyarrow", "tqdm", "threadpoolctl", "psycopg"),
}


@contextlib.contextmanager
def _requires_extra(extra: str, command: str):
    """Turn a missing optional dependency into one actionable `Error:` line (exit 7).

    Every module of the extra is looked for first: some are imported only late in a long run."""
    import importlib.util

    try:
        for name in EXTRA_MODULES[extra]:
            if importlib.util.find_spec(name) is None:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        yield
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in EXTRA_MODULES[extra]:
            raise
        from specbound_runtime.errors import DependencyError

        raise DependencyError(
            f"`specbound {command}` needs the '{extra}' extra ({root} is not installed); "
            f"run: pip install 'specbound[{extra}]'"
        ) from None


def _redact(text: str) -> str:
    """A storage URL's password never reaches a message."""
    from specbound.calibrate.study import redact

    return redact(text)


def _terminate(signum, frame):
    raise KeyboardInterrupt


_KERNELS_HELP = (
    "Kernel path: auto (default) prepacks the weights for oneDNN where that measures faster here "
    "(fp32 on the CPU; the extra memory and set-up time are printed), onednn insists, eager runs "
    "every module's own forward."
)


def _kernels(value: str) -> str:
    from specbound_runtime.kernels import KERNEL_MODES

    if value not in KERNEL_MODES:
        raise UsageError(f"--kernels must be one of {', '.join(KERNEL_MODES)}, got {value!r}")
    return value


def _load_decoder(model: str, artifact: Optional[Path], device: Optional[str] = None, dtype: Optional[str] = None, kernels: str = "auto"):
    import specbound_runtime as sb
    from specbound_runtime.decoder import Decoder

    decoder = Decoder(sb.load(model, artifact=artifact, device=device, dtype=dtype, kernels=_kernels(kernels)))
    _err(decoder.m.kernels.report.describe())
    return decoder


# Sampling options, the same on decode, bench and calibrate.
_TEMPERATURE_HELP = "Sample at this temperature (do_sample=True; 0 = greedy). Sampling is on when any of --temperature, --top-k, --top-p, --min-p is given; the output is distributed exactly as generate(do_sample=True)'s."
_TOP_K_HELP = "Sample from the k most likely tokens (0: off; transformers' default when sampling is 50)."
_TOP_P_HELP = "Sample from the smallest set of tokens holding this probability (nucleus sampling)."
_MIN_P_HELP = "Drop tokens less likely than min-p times the most likely one."


def _sampling_mode(temperature, top_k, top_p, min_p):
    from specbound_runtime.sampling import DecodingMode

    try:
        return DecodingMode.sampling(temperature, top_k, top_p, min_p)
    except ValueError as e:
        flags = str(e).replace("top_k", "--top-k").replace("top_p", "--top-p").replace("min_p", "--min-p")
        raise UsageError(flags.replace("temperature", "--temperature", 1)) from None


def _prompts(prompt: Optional[str], prompt_file: Optional[Path]):
    from specbound_runtime.prompts import Prompt, read_prompt_file, validate_prompt_text

    if (prompt is None) == (prompt_file is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt is not None:
        validate_prompt_text(prompt)
        return [Prompt(text=prompt)]
    return read_prompt_file(prompt_file)


@app.command(epilog=EXIT_CODES_HELP)
def decode(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Local HF folder, .gguf file, or built-in name smollm2-135m."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", "-a", help="Calibrated artifact from `specbound calibrate`; without it, the paper's default schedule."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One prompt."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", help="Plain text (one prompt) or JSONL with a `prompt` (or `turns`) field per line."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="New tokens per prompt; clamped with a warning to fit the model's context."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Apply the tokenizer's chat template (default: on when it has one)."),
    no_speculation: bool = typer.Option(False, "--no-speculation", help="Plain decoding (greedy or sampled) through the same engine (the fair baseline)."),
    check_exact: bool = typer.Option(False, "--check-exact", help="Also run transformers' generate() and fail (exit 6) if any token differs (greedy only)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt on stdout instead of streamed text."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu (default), cuda, cuda:N or mps."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on cpu, the checkpoint's own dtype on a GPU). Exactness is against generate() on the same device and dtype."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=_TEMPERATURE_HELP),
    top_k: Optional[int] = typer.Option(None, "--top-k", help=_TOP_K_HELP),
    top_p: Optional[float] = typer.Option(None, "--top-p", help=_TOP_P_HELP),
    min_p: Optional[float] = typer.Option(None, "--min-p", help=_MIN_P_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of sampling: prompt i of a file is seeded from (seed, i), so each output is reproducible alone (default: a fresh random seed per run)."),
    kernels: str = typer.Option("auto", "--kernels", help=_KERNELS_HELP),
    batch_size: int = typer.Option(1, "--batch-size", help="Decode this many prompts of the file at once (left-padded, one shared verification pass a round, single-turn prompts). Each prompt gives the tokens it gives alone; the text is printed when its batch ends, and a statistics line per batch reports throughput, per-row latency and peak memory. Sampling draws from one generator per batch, seeded from (--seed, the batch's first prompt index)."),
):
    """Generate with bounded early-exit self-speculation: greedy output equals plain greedy
    decoding token for token; sampled output (--temperature, --top-k, --top-p) is distributed
    exactly as generate(do_sample=True)'s.

    Text streams to stdout as it is accepted (with --batch-size above 1, per batch); statistics
    go to stderr."""
    with _one_error_path():
        from specbound_runtime.guard import PassCostWatch
        from specbound_runtime.sampling import PromptSampling

        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        mode = _sampling_mode(temperature, top_k, top_p, min_p)
        if mode.do_sample and check_exact:
            raise UsageError("--check-exact compares greedy outputs token by token; sampled outputs are checked in distribution (see `specbound bench --temperature`)")
        if seed is not None and not mode.do_sample:
            raise UsageError("--seed seeds sampling; give --temperature (or --top-k, --top-p, --min-p) too")
        if seed is not None and seed < 0:
            raise UsageError(f"--seed must be >= 0, got {seed}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        prompts = _prompts(prompt, prompt_file)
        if batch_size > 1 and any(len(p.turns or ()) > 1 for p in prompts):
            raise UsageError("--batch-size above 1 decodes single-turn prompts; this file has multi-turn ones (decode them with --batch-size 1)")
        decoder = _load_decoder(model, artifact, device, dtype, kernels)
        if artifact is None and not no_speculation:
            _err(
                "note: no --artifact, so decoding uses the paper's uncalibrated schedule, which is slower "
                f"than plain decoding on the models measured; calibrate first: specbound calibrate --model {model}"
            )
        use_chat = decoder.has_chat_template if chat is None else chat
        watch = None if no_speculation else PassCostWatch.for_artifact(decoder.m.policy, decoder.m.artifact_metadata)
        failures = 0
        if batch_size > 1:
            for first in range(0, len(prompts), batch_size):
                failures += _decode_batch(
                    decoder, prompts[first : first + batch_size], first, use_chat, max_new_tokens,
                    not no_speculation, check_exact, as_json, PromptSampling.of(mode, seed, first),
                )
            prompts = []
        for index, p in enumerate(prompts):
            messages: list[dict] = []
            sampling = PromptSampling.of(mode, seed, index)
            for turn_index, turn in enumerate(p.turns or (p.text,)):
                messages.append({"role": "user", "content": turn})
                failures += _decode_one(
                    decoder, messages, use_chat, max_new_tokens, not no_speculation,
                    check_exact, as_json, index, turn_index, sampling, watch,
                )
        if failures:
            from specbound_runtime.errors import ExactnessError

            raise ExactnessError(f"{failures} output(s) differed from generate(); see the lines above")


def _decode_batch(decoder, prompts, first, chat, max_new_tokens, speculation, check_exact, as_json, sampling):
    """Prompts first.. decoded as one batch: a record (or the text) per prompt, then the batch's
    statistics line; returns how many rows differed from generate() (with --check-exact)."""
    from specbound_runtime.decoder import peak_rss_mb
    from specbound_runtime.exactness import against_generate

    encoded = [decoder.encode([{"role": "user", "content": p.text}], chat, max_new_tokens) for p in prompts]
    if any(e.clamped for e in encoded):
        _err(f"warning: --max-new-tokens clamped to {min(e.max_new_tokens for e in encoded)} to fit the model's context")
    started = time.perf_counter()
    batch = decoder.generate_batch(encoded, speculation=speculation, mode=sampling.mode, generator=sampling.generator)
    call_s = time.perf_counter() - started
    failed = 0
    for offset, (e, result) in enumerate(zip(encoded, batch.rows)):
        index = first + offset
        text = decoder.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        record = decoder.turn_record(e, result, text, sampling, index, 0)
        record["batch"] = {"first_prompt": first, "rows": len(encoded), "latency_s": round(result.wall_time_s, 4)}
        if check_exact:
            record.update(against_generate(decoder.model, list(e.ids), list(result.token_ids), min(x.max_new_tokens for x in encoded), decoder.eos_token_ids, call_s / len(encoded)))
            if not record["exact"]:
                _err(f"prompt {index}: NOT exact: {record['divergence']}")
                failed += 1
        if as_json:
            typer.echo(json.dumps(record))
        else:
            typer.echo(text)
    latencies = sorted(r.wall_time_s for r in batch.rows)
    _err(
        f"[batch of prompts {first}-{first + len(encoded) - 1}] {batch.new_tokens} tokens in {batch.wall_time_s:.2f}s "
        f"= {batch.tokens_per_second:.1f} tok/s | row latency {latencies[0]:.2f}-{latencies[-1]:.2f}s "
        f"(median {latencies[len(latencies) // 2]:.2f}s) | {batch.verify_passes} shared passes | "
        f"acceptance {batch.accepted}/{batch.drafted} drafts | peak memory {peak_rss_mb()} MB"
    )
    return failed


def _decode_one(decoder, messages, chat, max_new_tokens, speculation, check_exact, as_json, index, turn, sampling, watch=None):
    from specbound_runtime.decoder import TextStream, turn_line
    from specbound_runtime.exactness import against_generate
    from specbound_runtime.guard import drift_warning

    encoded = decoder.encode(messages, chat, max_new_tokens)
    if encoded.clamped:
        _err(f"warning: --max-new-tokens clamped to {encoded.max_new_tokens} to fit the model's context")
    stream = None if as_json else TextStream(decoder.tokenizer)
    started = time.perf_counter()
    result = decoder.generate(encoded, speculation=speculation, on_tokens=stream, mode=sampling.mode, generator=sampling.generator)
    call_s = time.perf_counter() - started  # the whole call, as generate()'s is timed
    text = stream.finish() if stream else decoder.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    messages.append({"role": "assistant", "content": text})
    record = decoder.turn_record(encoded, result, text, sampling, index, turn)
    if watch is not None and not watch.warned:
        watch.add(result.pass_widths, result.pass_seconds)
        drift = watch.drift()
        if drift is not None:  # once per run
            watch.warned = True
            record["cost_drift"] = drift
            _err(drift_warning(drift))
    failed = 0
    if check_exact:
        ids, ours = list(encoded.ids), list(result.token_ids)
        record.update(against_generate(decoder.model, ids, ours, encoded.max_new_tokens, decoder.eos_token_ids, call_s))
        if not record["exact"]:
            _err(f"prompt {index} turn {turn}: NOT exact: {record['divergence']}")
            failed = 1
    if as_json:
        typer.echo(json.dumps(record))
    else:
        _err(turn_line(result, record, sampling.mode.do_sample))
    return failed


@app.command(epilog=EXIT_CODES_HELP)
def calibrate(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Local HF folder, .gguf file, or built-in name smollm2-135m."),
    corpus: str = typer.Option("default", "--corpus", help="`default` (built-in essays, Wikipedia and chat prompts) or local .txt/.jsonl/.json/.parquet files, comma-separated; rows with `text` (human text) and/or `prompt` (answered by the model)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact path (default artifacts/<model>.safetensors)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the tuning sampler and of the prompt draw."),
    trials: int = typer.Option(200, "--trials", help="Optuna trials against the simulator (milliseconds each)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: sqlite file in the work folder; a study resumes). Give a PostgreSQL password in PGPASSWORD or ~/.pgpass, not in the URL."),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="Optuna study name (default derived from the job)."),
    multi_objective: bool = typer.Option(False, "--multi-objective", help="Tune speed vs waste; writes the Pareto front as JSON and PNG."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Folder for answers, shards and the study (default runs/calibrate-...); rerun to resume."),
    prompts: int = typer.Option(72, "--prompts", help="Prompts whose answers are recorded. The default corpus holds --held-out-per-kind of each held-out kind among them; a file corpus holds out about --held-out-fraction of its prompts (of each `kind`, where rows name one)."),
    held_out_per_kind: int = typer.Option(3, "--held-out-per-kind", help="The default corpus's held-out prompts of each kind (chat, code, math, extraction, summarization, translation, rag): a policy ships only if it is predicted never slower than plain decoding on every kind."),
    documents: int = typer.Option(64, "--documents", help="Human-text documents recorded (20% held out)."),
    answer_tokens: int = typer.Option(128, "--answer-tokens", help="Tokens of each recorded answer."),
    shortlist_size: int = typer.Option(4096, "--shortlist-size", help="Vocabulary short-list of the exit head."),
    measure_prompts: int = typer.Option(7, "--measure-prompts", help="Held-out prompts decoded for real at the end, one of each kind in turn (0: skip)."),
    measure_tokens: int = typer.Option(128, "--measure-tokens", help="New tokens per measured prompt."),
    remeasure_costs: bool = typer.Option(False, "--remeasure-costs", help="Measure the cost model again instead of using the cached one."),
    costs: Optional[str] = typer.Option(None, "--costs", help="A cost model pinned with `specbound costs` (default: measured on this machine, cached)."),
    workers: int = typer.Option(1, "--workers", help="Local worker processes sharing collection and tuning (more than 1 needs a postgresql:// --storage)."),
    job: Optional[Path] = typer.Option(None, "--job", help="A TOML job file holding every setting (see README); flags given too override it."),
    check: bool = typer.Option(False, "--check", help="With --job or --from-artifact: rebuild in a temporary folder and compare with the committed artifact byte for byte (exit 8 and a field-by-field report when they differ)."),
    from_artifact: Optional[Path] = typer.Option(None, "--from-artifact", help="Rebuild from the job and cost model an artifact recorded (relative paths from the current folder)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact."),
    as_json: bool = typer.Option(False, "--json", help="Print the report (or the --check result) as JSON on stdout."),
    device: Optional[str] = typer.Option(None, "--device", help="Where the model runs while recording: cpu (default), cuda, cuda:N or mps."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on cpu, the checkpoint's own dtype on a GPU). The artifact serves the same checkpoint in any dtype."),
    record_dtype: Optional[str] = typer.Option(None, "--record-dtype", help="float64: record on a float64 copy of the model, so that the artifact is byte-identical on any CPU kind (AVX2 or AVX-512) given a pinned cost model, at about twice the collection time; for CI checks on mixed runners (default: the model's own dtype)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Tune for sampling at this temperature (default: greedy): the model's own answers are sampled, drafts scored by their acceptance probability under speculative sampling; the artifact records the mode."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Tune for sampling with this top-k."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Tune for sampling with this top-p."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Tune for sampling with this min-p."),
):
    """Fit temperatures, thresholds and bounds for a model; export one safetensors artifact.

    Collect per-layer statistics over a corpus (resumable shards), fit per-layer temperatures and a
    ridge lens, tune the policy with Optuna against a simulator of the decode loop under a cost
    model (measured on this machine, or pinned), export, then decode held-out prompts for real.
    The artifact records the resolved job; the same job gives the same bytes with any number of
    workers."""
    with _one_error_path():
        with _requires_extra("calibrate", "calibrate"):
            from specbound.calibrate.check import changes_words, policy_changes
            from specbound.calibrate.export import calibration_summary
            from specbound.calibrate.run import run_calibration
        from specbound.calibrate.job import calibrate_options

        values = {
            "model": model, "corpus": corpus, "out": out, "seed": seed, "trials": trials, "storage": storage,
            "study_name": study_name, "multi_objective": multi_objective, "force": force, "work_dir": work_dir,
            "prompts": prompts, "held_out_per_kind": held_out_per_kind, "documents": documents, "answer_tokens": answer_tokens,
            "shortlist_size": shortlist_size, "measure_prompts": measure_prompts, "measure_tokens": measure_tokens,
            "remeasure_costs": remeasure_costs, "costs_file": costs, "workers": workers, "device": device, "dtype": dtype,
            "record_dtype": record_dtype, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
        }
        given = {name for name in values if ctx.get_parameter_source("costs" if name == "costs_file" else name).name == "COMMANDLINE"}
        opts = calibrate_options(values, given, job, from_artifact, check, _err)
        if check:
            _check(opts, from_artifact, as_json)
            return
        outcome = run_calibration(opts)
        report = outcome.report
        if from_artifact is not None:  # a retune (another cost model, more trials): what moved
            report["changed_from_source"] = policy_changes(from_artifact, outcome.artifact)
        if as_json:
            typer.echo(json.dumps(report, sort_keys=True))
            return
        typer.echo(calibration_summary(report))
        if from_artifact is not None:
            typer.echo(f"changed from {from_artifact}: {changes_words(report['changed_from_source'])}")


def _check(opts, from_artifact: Optional[Path], as_json: bool) -> None:
    from specbound.calibrate.check import rebuild_and_compare
    from specbound_runtime.errors import MismatchError

    result = rebuild_and_compare(opts, from_artifact, _err)
    typer.echo(json.dumps(result.to_dict(), sort_keys=True) if as_json else result.report())
    if not result.identical:
        raise MismatchError(
            f"the rebuilt artifact differs from {result.committed} ({len(result.differences)} field(s); the report above says "
            "what moved and by how much)"
        )


@app.command(epilog=EXIT_CODES_HELP)
def inspect(
    artifact: Path = typer.Argument(..., help="Artifact file."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
):
    """Show what an artifact holds: policy, exit head, fingerprints, predictions."""
    with _one_error_path():
        from specbound_runtime.describe import describe, describe_lines

        info = describe(artifact)
        if as_json:
            typer.echo(json.dumps(info, sort_keys=True))
            return
        for line in describe_lines(info):
            typer.echo(line)


@app.command(epilog=EXIT_CODES_HELP)
def costs(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Local HF folder, .gguf file, or built-in name smollm2-135m."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the cost model (JSON), for a job's [costs] file."),
    shortlist_size: int = typer.Option(4096, "--shortlist-size", help="Vocabulary short-list of the exit head (the job's [collect] shortlist_size)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
    as_json: bool = typer.Option(False, "--json", help="Print the cost model as JSON on stdout."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu (default), cuda, cuda:N or mps."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on cpu, the checkpoint's own dtype on a GPU)."),
    kernels: str = typer.Option("auto", "--kernels", help=_KERNELS_HELP),
):
    """Measure the cost model of the decode loop (ms per layer call, LM head, exit check, round)
    on this machine and write it to a file, so that a job can pin it: every machine that runs the
    job then tunes against the same costs. Measured in 5 rounds (medians of repeats); the file keeps
    the rounds' median and every round, and tuning scores a policy by its least speedup over the
    rounds. Rounds that disagree by more than 25% are measured again (a busy machine is reported).
    The batch engine's shared pass is timed too, at 1, 4 and 16 rows of 1-6 positions each: the
    prices the tuner's batch simulator and each batch round's width use."""
    with _one_error_path():
        with _requires_extra("calibrate", "costs"):
            from specbound.calibrate.costs import costs_report, kernel_path, measure_costs, measure_roofline, pinned_costs
        import specbound_runtime as sb
        from specbound_runtime.files import atomic_write_bytes

        if shortlist_size < 1:
            raise UsageError(f"--shortlist-size must be >= 1, got {shortlist_size}")
        if out.exists() and not force:
            raise UsageError(f"{out} already exists; pass --force to replace it or choose another --out")
        loaded = sb.load(model, device=device, dtype=dtype, kernels=_kernels(kernels))
        _err(loaded.kernels.report.describe())
        _err(f"measuring the cost model of {loaded.fingerprint.short()} ...")
        cost = measure_costs(loaded.lm, shortlist_size, warn=_err)
        roofline = measure_roofline(loaded.lm)
        document = pinned_costs(cost, loaded.fingerprint, shortlist_size, kernel_path(loaded.lm), roofline)
        atomic_write_bytes(out, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode())
        if as_json:
            typer.echo(json.dumps(document, sort_keys=True))
            return
        typer.echo(f"wrote {out}: {costs_report(cost, roofline, document)}")


@app.command(epilog=EXIT_CODES_HELP)
def bench(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Local HF folder, .gguf file, or built-in name smollm2-135m."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", "-a", help="Calibrated artifact; needed by the specbound, oracle and limit methods (skipped without it)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated tasks. Default: writing, roleplay, reasoning, math, coding, extraction, stem, humanities (MT-Bench's categories), translation, summarization, qa, math-reasoning (MMATH, which 'math' named before), rag. Also: mt-bench (all 80 questions), code (HumanEval)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="New tokens per answer at most."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods (default all): hf-greedy (greedy) or hf-sample (sampling): the reference, always runs; hf-greedy-compiled (transformers' static cache + torch.compile, greedy only; warm-up reported apart); ort-genai and ort-genai-ngram (ONNX Runtime GenAI, plain and n-gram; the peers extra; greedy only); ar, hf-prompt-lookup, hf-early-exit, specbound-paper, specbound, oracle and limit (greedy only; simulated: perfect exits, and every draft free and right)."),
    repeats: int = typer.Option(3, "--repeats", help="Timed repeats per answer (speedup: ratio of medians); hf-early-exit runs once."),
    prompts_per_task: int = typer.Option(1, "--prompts-per-task", help="Answers per task (MT-Bench's tasks: the turns of its first ceil(N/2) questions in order, so 1 is one first turn, 2 both turns of one question); the default full run takes about 24 min on 2 cores."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/bench-<model>-<settings hash>); rerunning the same command there resumes."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout instead of the Markdown table."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu (default), cuda, cuda:N or mps; every method runs there."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on cpu, the checkpoint's own dtype on a GPU)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sample, every method with the same settings: " + _TEMPERATURE_HELP),
    top_k: Optional[int] = typer.Option(None, "--top-k", help=_TOP_K_HELP),
    top_p: Optional[float] = typer.Option(None, "--top-p", help=_TOP_P_HELP),
    min_p: Optional[float] = typer.Option(None, "--min-p", help=_MIN_P_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling: answer i is seeded from (seed, i), the same for every method and repeat."),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", help="Bench batches instead: comma-separated batch sizes (e.g. 1,4,16). The first turns of --prompts-per-task prompts of each task, cut into batches in advance (the same for every method, listed in results.json); transformers' batched generate() (hf-greedy), SpecBound's plain batched decoding (ar) and SpecBound (specbound, needs --artifact) on each, one timed run per batch and method (--repeats does not apply); tokens/s counts tokens up to each row's EOS, and every row is checked against generate() on its prompt alone. Greedy only."),
):
    """Benchmark every decoding method on the same task prompts, interleaved, on this machine.

    Reports per task and overall: tokens/s, speedup over the reference (hf-greedy, or hf-sample:
    generate(do_sample=True) when sampling), mean accepted length, acceptance rate, and exactness
    against hf-greedy (greedy) or the distribution check's p-value (sampling), and the share of
    emitted tokens from each draft source; per method, the worst task; and the simulator's oracle
    bound (greedy) and limit (every draft free and right at the artifact's width). Writes
    results.json, table.md, speedup.png and Spec-Bench-style <method>.jsonl into --out.

    Every finished measurement is kept in --out/measurements.jsonl at once: an interrupted bench
    resumes when the same command is run again; a different command there is refused."""
    with _one_error_path():
        import shlex

        from specbound.bench.harness import BenchOptions, parse_names, run_bench
        from specbound.bench.methods import METHODS
        from specbound.data.tasks import DEFAULT_TASKS, TASKS

        mode = _sampling_mode(temperature, top_k, top_p, min_p)  # flag-worded errors before anything loads
        if seed < 0:
            raise UsageError(f"--seed must be >= 0, got {seed}")
        if batch_size is not None:
            _bench_batches(model, artifact, tasks, methods, mode, max_new_tokens, prompts_per_task, out, batch_size, as_json, device, dtype)
            return

        opts = BenchOptions(
            model=model, artifact=artifact, tasks=DEFAULT_TASKS if tasks is None else parse_names(tasks, TASKS, "--tasks"),
            methods=parse_names(methods, METHODS, "--methods"), max_new_tokens=max_new_tokens,
            repeats=repeats, prompts_per_task=prompts_per_task, out=out,
            device=device, dtype=dtype, command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, sample_seed=seed,
        )
        with _requires_extra("calibrate", "bench"):  # run_bench imports the plot's and the oracle's modules first
            outcome = run_bench(opts)
        typer.echo(json.dumps(outcome.results, sort_keys=True) if as_json else outcome.table, nl=as_json)
        _err(f"wrote {', '.join(p.name for p in outcome.files)} to {outcome.out_dir}")


def _bench_batches(model, artifact, tasks, methods, mode, max_new_tokens, prompts_per_task, out, batch_size, as_json, device, dtype) -> None:
    from specbound.bench.harness import parse_names
    from specbound.data.tasks import DEFAULT_TASKS, TASKS

    try:
        sizes = [int(x) for x in batch_size.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch-size takes comma-separated whole numbers, got {batch_size!r}") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-size must list sizes >= 1, got {batch_size!r}")
    if mode.do_sample:
        raise UsageError("bench --batch-size runs greedy batches; drop the sampling flags")
    if methods is not None:
        raise UsageError("bench --batch-size runs its own methods (hf-greedy, ar, specbound); drop --methods")
    if max_new_tokens < 1 or prompts_per_task < 1:
        raise UsageError("--max-new-tokens and --prompts-per-task must be >= 1")
    if artifact is not None and not artifact.exists():
        from specbound_runtime.errors import ArtifactError

        raise ArtifactError(f"artifact not found: {artifact}; make one with `specbound calibrate`")
    chosen = DEFAULT_TASKS if tasks is None else parse_names(tasks, TASKS, "--tasks")
    out = out or Path("runs") / f"bench-batches-{model.replace('/', '_')}"
    with _requires_extra("calibrate", "bench"):
        from specbound.bench.batches import batch_table, run_batch_bench

        results = run_batch_bench(model, artifact, chosen, prompts_per_task, max_new_tokens, sizes, out, device=device, dtype=dtype)
    typer.echo(json.dumps(results, sort_keys=True) if as_json else batch_table(results), nl=as_json)
    _err(f"wrote results.json, table.md and alone.jsonl to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

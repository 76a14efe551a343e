"""The `specbound` command: parse, call, print. Every domain error becomes one `Error: ...` line."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from specbound_runtime.errors import EXIT_CODES_HELP, EXIT_INTERRUPTED, SpecBoundError, UsageError

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
    try:
        yield
    except SpecBoundError as e:
        if _state["debug"]:
            raise
        _err(f"Error: {e}")
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        _err("Error: interrupted; work already written to disk is kept, rerun to resume")
        raise typer.Exit(EXIT_INTERRUPTED)


def _load_decoder(model: str, artifact: Optional[Path]):
    from specbound_runtime.decoder import Decoder
    from specbound_runtime.models import eos_token_ids, resolve_model

    loaded = resolve_model(model)
    policy = exit_weights = None
    if artifact is not None:
        from specbound_runtime.artifact import load_artifact

        art = load_artifact(artifact, loaded.fingerprint, loaded.tokenizer_fingerprint)
        policy, exit_weights = art.policy, art.exit_weights
    return loaded, Decoder(loaded.model, loaded.tokenizer, eos_token_ids(loaded), policy, exit_weights)


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
    no_speculation: bool = typer.Option(False, "--no-speculation", help="Plain greedy decoding through the same engine (the fair baseline)."),
    check_exact: bool = typer.Option(False, "--check-exact", help="Also run transformers' generate() and fail (exit 6) if any token differs."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt on stdout instead of streamed text."),
):
    """Generate greedily with bounded early-exit self-speculation; output equals plain greedy decoding.

    Text streams to stdout as it is accepted; statistics go to stderr."""
    with _one_error_path():
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        prompts = _prompts(prompt, prompt_file)
        loaded, decoder = _load_decoder(model, artifact)
        use_chat = decoder.has_chat_template if chat is None else chat
        failures = 0
        for index, p in enumerate(prompts):
            messages: list[dict] = []
            for turn_index, turn in enumerate(p.turns or (p.text,)):
                messages.append({"role": "user", "content": turn})
                failures += _decode_one(
                    loaded, decoder, messages, use_chat, max_new_tokens, not no_speculation,
                    check_exact, as_json, index, turn_index,
                )
        if failures:
            from specbound_runtime.errors import ExactnessError

            raise ExactnessError(f"{failures} output(s) differed from generate(); see the lines above")


def _decode_one(loaded, decoder, messages, chat, max_new_tokens, speculation, check_exact, as_json, index, turn):
    from specbound_runtime.decoder import TextStream, exit_layer_histogram
    from specbound_runtime.exactness import divergence, reference_greedy

    encoded = decoder.encode(messages, chat, max_new_tokens)
    if encoded.clamped:
        _err(f"warning: --max-new-tokens clamped to {encoded.max_new_tokens} to fit the model's context")
    stream = None if as_json else TextStream(decoder.tokenizer)
    result = decoder.generate(encoded, speculation=speculation, on_tokens=stream)
    text = stream.finish() if stream else decoder.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    messages.append({"role": "assistant", "content": text})
    record = {
        "prompt_index": index,
        "turn": turn,
        "text": text,
        "token_ids": list(result.token_ids),
        "new_tokens": result.new_tokens,
        "wall_time_s": round(result.wall_time_s, 4),
        "tokens_per_s": round(result.tokens_per_second, 2),
        "accept_lengths": list(result.accept_lengths),
        "mean_accepted_length": round(result.mean_accepted_length, 4),
        "acceptance_rate": round(result.acceptance_rate, 4),
        "exit_layers": list(result.exit_layers),
        "verify_passes": result.verify_passes,
        "fallbacks": result.fallbacks,
        "clamped": encoded.clamped,
    }
    failed = 0
    if check_exact:
        ref = reference_greedy(decoder.model, list(encoded.ids), encoded.max_new_tokens, decoder.eos_token_ids)
        div = divergence(decoder.model, list(encoded.ids), list(result.token_ids), ref)
        record["exact"] = div is None
        if div is not None:
            record["divergence"] = div.describe()
            _err(f"prompt {index} turn {turn}: NOT exact: {div.describe()}")
            failed = 1
    if as_json:
        typer.echo(json.dumps(record))
    else:
        hist = " ".join(f"{k}:{v}" for k, v in exit_layer_histogram(result.exit_layers).items()) or "none"
        _err(
            f"[prompt {index} turn {turn}] {result.new_tokens} tokens in {result.wall_time_s:.2f}s "
            f"= {result.tokens_per_second:.1f} tok/s | mean accepted length {result.mean_accepted_length:.2f} "
            f"| acceptance {result.acceptance_rate:.0%} of {result.drafted} drafts | {result.verify_passes} "
            f"verify passes | exit layers {hist}"
            + (f" | {result.fallbacks} full-depth fallbacks" if result.fallbacks else "")
            + ("" if not check_exact else f" | exact: {'yes' if not failed else 'NO'}")
        )
    return failed


def main() -> None:
    app()


if __name__ == "__main__":
    main()

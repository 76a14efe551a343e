"""One family of domain errors. The CLI turns each into one `Error: ...` line and its exit code."""

from __future__ import annotations

# Exit codes, listed in `specbound --help`.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: rerun with --debug and report the traceback
EXIT_USAGE = 2  # impossible flag values
EXIT_INPUT = 3  # prompts, corpus, files that cannot be read
EXIT_MODEL = 4  # model path, weights, architecture
EXIT_ARTIFACT = 5  # artifact missing, corrupt, or fitted for another model
EXIT_EXACTNESS = 6  # speculative output differed from plain greedy decoding
EXIT_DEPENDENCY = 7  # an optional dependency (an install extra) is missing
EXIT_MISMATCH = 8  # `calibrate --check`: the rebuilt artifact differs from the committed one
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 internal error (rerun with --debug); 2 bad flag values; "
    "3 bad input (prompt, corpus, job file, cost file, study storage); 4 model cannot be loaded or is unsupported; "
    "5 artifact missing, corrupt or for another model; 6 output not identical to greedy; "
    "7 an optional dependency is missing (the message names the extra to install); "
    "8 `calibrate --check` rebuilt an artifact that differs from the committed one (the report says what moved); "
    "130 interrupted (work already written is kept)."
)


class SpecBoundError(Exception):
    """Base of every error a user can cause. The message says what is wrong and what to do."""

    exit_code = EXIT_INTERNAL


class UsageError(SpecBoundError):
    exit_code = EXIT_USAGE


class InputError(SpecBoundError):
    exit_code = EXIT_INPUT


class ModelError(SpecBoundError):
    exit_code = EXIT_MODEL


class ArtifactError(SpecBoundError):
    exit_code = EXIT_ARTIFACT


class ExactnessError(SpecBoundError):
    exit_code = EXIT_EXACTNESS


class DependencyError(SpecBoundError):
    exit_code = EXIT_DEPENDENCY


class MismatchError(SpecBoundError):
    exit_code = EXIT_MISMATCH


class SpecBoundWarning(UserWarning):
    """Something the user may want to act on, where the output is still exact (the CLI prints it as
    one `warning: ...` line)."""

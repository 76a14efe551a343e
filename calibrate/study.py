"""One Optuna study shared by any number of workers, whose trials do not depend on who ran them.

Trials are proposed in fixed batches. Batch k holds trial indices k*B .. k*B+B-1; its parameters
come from a sampler seeded with (seed, k) that has seen exactly the trials of batches 0..k-1, in
index order, rebuilt in memory from the storage. So every worker proposes the same parameters
for the same index, whatever finished first. A trial is written to the storage once evaluated,
as one finished trial carrying its index (`user_attrs["index"]`): a killed worker loses only the
trial it was evaluating, and a restarted or joining worker skips every index already there. Two
workers may evaluate the same index at the same moment; both give the same result, and readers
keep the first.

Storage URLs can hold a password: every message here shows them through `redact`.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Callable

from specbound_runtime.errors import DependencyError, InputError, UsageError

_STORAGE = re.compile(r"^(sqlite|postgresql|postgres|mysql)(\+\w+)?://")
_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)(?P<password>[^@\s/]*)@", re.IGNORECASE)
INDEX = "index"
JOB_KEY = "specbound_job_key"
WAIT_FOR_OTHERS_S = 2.0  # how long a worker lets others finish their share of a batch


def redact(text: str) -> str:
    """Hide the password of every URL in `text` (user:***@host)."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***@", text)


def check_storage_url(url: str) -> str:
    if not _STORAGE.match(url):
        raise UsageError(
            f"unknown --storage URL {redact(url)!r}; use an Optuna RDB URL such as sqlite:///study.db or "
            "postgresql://user@host/db (a password is best given in PGPASSWORD or ~/.pgpass)"
        )
    return url


def is_shared(url: str) -> bool:
    """Whether several processes may write the study at once (SQLite serialises badly)."""
    return not url.startswith("sqlite")


@dataclass(frozen=True)
class Finished:
    """One evaluated trial, as read back from the storage."""

    index: int
    params: dict
    values: tuple[float, ...]
    user_attrs: dict
    distributions: dict
    system_attrs: dict


def open_study(storage: str, study_name: str, directions: list[str], job_key: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if storage.startswith(("postgresql", "postgres")):
        try:
            import psycopg  # noqa: F401  (SQLAlchemy's PostgreSQL driver)
        except ModuleNotFoundError:
            raise DependencyError(
                "a postgresql:// storage needs psycopg (part of the 'calibrate' extra); run: pip install 'specbound[calibrate]'"
            ) from None
    try:
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
        study = optuna.create_study(
            storage=rdb, study_name=study_name, directions=directions, load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(seed=0),  # never asked: batches are proposed in memory
        )
    except Exception as e:  # SQLAlchemy and the drivers raise many types; their text may echo the URL
        first = redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise InputError(f"cannot open the study storage {redact(storage)}: {first}") from None
    if len(study.directions) != len(directions):
        raise UsageError(f"study {study_name!r} in {redact(storage)} was made with other objectives; use another study name")
    theirs = study.user_attrs.get(JOB_KEY)
    if theirs is None:
        study.set_user_attr(JOB_KEY, job_key)
    elif theirs != job_key:
        raise UsageError(
            f"study {study_name!r} in {redact(storage)} holds trials of another job (its settings, recorded "
            "data or cost model differ); use another study name, or the same job, data and pinned cost model"
        )
    return study


def finished_trials(study) -> dict[int, Finished]:
    """Every evaluated index, the first stored trial of each."""
    import optuna

    out: dict[int, Finished] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number):
        index = t.user_attrs.get(INDEX)
        if isinstance(index, int) and index not in out:
            out[index] = Finished(index, dict(t.params), tuple(t.values), dict(t.user_attrs), dict(t.distributions), dict(t.system_attrs))
    return out


def pareto_front(trials: list[Finished], directions: list[str]) -> list[Finished]:
    """The trials no other one dominates, by Optuna's own front (`Study.best_trials`) over these
    trials alone, in their order."""
    import optuna

    scratch = optuna.create_study(directions=directions)
    scratch.add_trials([
        optuna.trial.create_trial(params=t.params, distributions=t.distributions, values=list(t.values), user_attrs={"k": k})
        for k, t in enumerate(trials)
    ])
    return [trials[k] for k in sorted(t.user_attrs["k"] for t in scratch.best_trials)]


def run_batches(
    study,
    n_trials: int,
    batch: int,
    seed: int,
    make_sampler: Callable[[int], object],
    suggest: Callable[[object], None],
    evaluate: Callable[[dict], tuple[tuple[float, ...], dict]],
    first_params: dict | None = None,
    worker: int = 0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[Finished]:
    """Evaluate trials 0..n_trials-1 in batches; return them in index order.

    suggest(trial) asks an Optuna trial for its parameters; evaluate(params) returns the objective
    values and the user attributes to store. first_params is enqueued as trial 0."""
    import optuna

    directions = study.directions
    done = finished_trials(study)
    counted = {i for i in done if i < n_trials}
    if progress is not None and counted:
        progress(len(counted))
    for k in range(-(-n_trials // batch)):
        indices = list(range(k * batch, min((k + 1) * batch, n_trials)))
        if all(i in done for i in indices):
            continue
        proposals = _propose(done, indices, k, seed, directions, make_sampler, suggest, first_params)
        mine = [i for i in indices if i % max(1, workers) == worker % max(1, workers)]
        others = [i for i in indices if i not in mine]
        for group, patient in ((mine, False), (others, True)):
            waited_since = time.monotonic()
            for i in group:
                if patient and workers > 1:
                    while i not in done and time.monotonic() - waited_since < WAIT_FOR_OTHERS_S:
                        time.sleep(0.05)
                        done = finished_trials(study)
                if i in done:
                    continue
                params, distributions, system_attrs = proposals[i]
                values, attrs = evaluate(params)
                study.add_trial(
                    optuna.trial.create_trial(
                        params=params, distributions=distributions, values=list(values),
                        user_attrs={**attrs, INDEX: i, "worker": f"{socket.gethostname()}:{os.getpid()}"}, system_attrs=system_attrs,
                    )
                )
                done[i] = Finished(i, params, tuple(values), {**attrs, INDEX: i}, distributions, system_attrs)
                counted.add(i)
                if progress is not None:
                    progress(1)
        by_others = [i for i in indices if i not in counted]
        counted.update(by_others)
        if progress is not None and by_others:
            progress(len(by_others))
    done = finished_trials(study)
    return [done[i] for i in range(n_trials)]


def _propose(done, indices, k, seed, directions, make_sampler, suggest, first_params):
    """Parameters of batch k's trials: a sampler seeded by (seed, k) that has seen the trials of
    the earlier batches, in index order (rebuilt in memory, so identical in every worker)."""
    import optuna

    memory = optuna.create_study(directions=[d.name.lower() for d in directions], sampler=make_sampler(seed * 1_000_003 + k))
    earlier = [done[i] for i in range(indices[0]) if i in done]
    if len(earlier) != indices[0]:
        raise RuntimeError(f"batch {k} proposed before the earlier batches finished")
    memory.add_trials(
        [
            optuna.trial.create_trial(params=f.params, distributions=f.distributions, values=list(f.values), system_attrs=f.system_attrs)
            for f in earlier
        ]
    )
    if k == 0 and first_params is not None:
        memory.enqueue_trial(first_params)
    proposals = {}
    for i in indices:
        trial = memory.ask()
        suggest(trial)
        frozen = memory.trials[-1]
        proposals[i] = (dict(trial.params), dict(frozen.distributions), dict(frozen.system_attrs))
    return proposals


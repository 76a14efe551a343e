"""Calibration spread over workers, on a real PostgreSQL server (scripts/pg.sh; the tests fail,
never skip, when none can be had): 4 local workers give the bytes of 1; a killed worker loses no
finished trial and a restarted one resumes; shards are claimed so no worker repeats another's;
a password in the storage URL reaches no artifact, report, log or message."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clitools import assert_one_error, invoke
from postgres import new_database, postgres_server  # noqa: F401  (a fixture)
from test_jobs import job_folder, write_corpus, write_job

pytestmark = pytest.mark.usefixtures("one_thread")
TRIALS = 24


def pg_job(folder: Path, name: str, url: str, workers: int = 1) -> Path:
    job = write_job(folder, name)
    text = job.read_text().replace("trials = 20", f'trials = {TRIALS}\nstorage = "{url}"\nworkers = {workers}')
    job.write_text(text.replace("answer_tokens = 12", "answer_tokens = 48"))
    return job


def workers_folder(root: Path) -> Path:
    """The jobs' folder with a corpus big enough (about 30 shards, seconds of work) that the workers
    that start a fraction of a second after the first still find shards to build."""
    folder = job_folder(root)
    write_corpus(folder / "corpus.jsonl", texts=120, prompts=64)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, postgres_server):
    """The job with one worker: (folder, artifact bytes)."""
    folder = workers_folder(tmp_path_factory.mktemp("workers"))
    job = pg_job(folder, "one", new_database(postgres_server, "one"))
    result = invoke("calibrate", "--job", job)
    assert result.exit_code == 0, result.stderr
    return folder, (folder / "out" / "one.safetensors").read_bytes()


def _password(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def test_four_local_workers_give_the_bytes_of_one(reference, postgres_server, capfd):
    import optuna

    folder, one = reference
    url = new_database(postgres_server, "four")
    result = invoke("calibrate", "--job", pg_job(folder, "four", url, workers=4))
    children = capfd.readouterr()  # the worker processes write to the real stderr
    assert result.exit_code == 0, result.stderr + children.err
    assert (folder / "out" / "four.safetensors").read_bytes() == one
    log = (folder / "runs" / "four" / "workers.log").read_text()
    started = {line.split()[1] for line in log.splitlines() if " started" in line}
    assert len(started) == 4 and all(f"worker {i} of 4 started" in log for i in range(4))
    # the work was shared: shards built by several processes, trials evaluated by several
    builders = {line.split()[1] for line in log.splitlines() if " built " in line}
    storage = optuna.storages.RDBStorage(url)
    (summary,) = optuna.get_all_study_summaries(storage)
    evaluators = {t.user_attrs["worker"] for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials}
    assert len(builders) >= 2 and len(evaluators) >= 2, (builders, evaluators)
    # the password of the storage URL is nowhere: artifact, report, messages, work folder
    secret = _password(url)
    assert len(secret) >= 16
    for path in [folder / "out" / "four.safetensors", folder / "out" / "four.report.json", *(folder / "runs" / "four").rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr + children.out + children.err


def test_a_wrong_password_is_reported_without_it(reference, postgres_server):
    folder, _ = reference
    url = postgres_server.replace(_password(postgres_server), "not-the-password-1234")
    job = pg_job(folder, "one", url.rsplit("/", 1)[0] + "/one")
    job.write_text(job.read_text().replace('artifact = "out/one.safetensors"', 'artifact = "out/refused.safetensors"'))
    error = assert_one_error(invoke("calibrate", "--job", job), 3, "cannot open the study storage", "password authentication failed")
    assert "not-the-password-1234" not in error and "specbound:***@127.0.0.1" in error


def _complete_trials(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as connection:
        if not connection.execute("SELECT to_regclass('trials') IS NOT NULL").fetchone()[0]:
            return 0
        return connection.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]


def test_a_killed_worker_loses_no_trial_and_a_restarted_one_resumes(reference, postgres_server):
    import optuna

    folder, one = reference
    url = new_database(postgres_server, "killed")
    job = pg_job(folder, "killed", url)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, "-m", "specbound.cli", "calibrate", "--job", str(job)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _complete_trials(url) < 10 and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    storage = optuna.storages.RDBStorage(url)
    (summary,) = optuna.get_all_study_summaries(storage)
    before = {t.user_attrs["index"]: t.values for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials}
    assert 10 <= len(before) < TRIALS, f"the worker was not killed during tuning ({len(before)} trials stored)"
    result = invoke("calibrate", "--job", job)
    assert result.exit_code == 0, result.stderr
    assert (folder / "out" / "killed.safetensors").read_bytes() == one
    after = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert sorted(t.user_attrs["index"] for t in after) == list(range(TRIALS))  # each once: none lost, none redone
    assert all(before[t.user_attrs["index"]] == t.values for t in after if t.user_attrs["index"] in before)


def _build_shards(folder: str, worker: int, out) -> None:
    from specbound.calibrate.shards import make_shards

    def build(i: int) -> bytes:
        time.sleep(0.15)
        out.put((i, os.getpid()))
        return f"shard {i}".encode()

    make_shards(Path(folder), 10, ".txt", build, worker=worker, workers=2)


def test_two_workers_split_the_shards_and_never_repeat_one(tmp_path):
    context = multiprocessing.get_context("fork")
    built = context.Queue()
    workers = [context.Process(target=_build_shards, args=(str(tmp_path), w, built)) for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    made = []
    while not built.empty():
        made.append(built.get(timeout=5))
    assert sorted(i for i, _ in made) == list(range(10))  # every shard once
    assert len({pid for _, pid in made}) == 2  # both took a share
    assert [p.read_text() for p in sorted(tmp_path.glob("shard-*.txt"))] == [f"shard {i}" for i in range(10)]


def test_sqlite_refuses_several_workers(tmp_path):
    folder = job_folder(tmp_path)
    job = write_job(folder, "lite")
    job.write_text(job.read_text().replace("trials = 20", "trials = 20\nworkers = 2"))
    assert_one_error(invoke("calibrate", "--job", job), 2, "2 workers need", "postgresql://")

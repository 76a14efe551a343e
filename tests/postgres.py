"""A real PostgreSQL server for tests, from scripts/pg.sh (which installs PostgreSQL with apt-get
when its server programs are missing). `from postgres import postgres_server, new_database`.

    postgres_server (session fixture) -> str
        The URL of a server started in a temporary folder on 127.0.0.1 and a free port, with a
        password; stopped and deleted at the end. No server: the test FAILS (never skips).

    new_database(server_url, name) -> str
        Create database `name` on that server; its URL.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def postgres_server():
    folder = Path(tempfile.mkdtemp(prefix="specbound-pg-"))
    folder.chmod(0o755)  # the server runs as the postgres user, who must reach its folder
    started = subprocess.run(
        ["bash", str(ROOT / "scripts" / "pg.sh"), "start", str(folder / "server")], capture_output=True, text=True
    )
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"no PostgreSQL server could be started (scripts/pg.sh start):\n{started.stderr}", pytrace=False)
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "pg.sh"), "stop", str(folder / "server")], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def new_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name

"""Choosing where the service listens: `SPEFT_PORT` for `speft run` (what `make run` starts),
and `make run PORT=… HOST=…` handing the options to it."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.processes import REPO, service_env, spawn_cli, stop, wait_ready
from tests.fixtures.s3 import _free_port


@pytest.mark.slow
def test_speft_run_listens_on_spefts_port_setting(tmp_path: Path) -> None:
    port = _free_port()
    env = service_env(SPEFT_DATABASE_URL=f"sqlite:///{tmp_path / 'speft.db'}",
                      SPEFT_STORAGE_URL=f"file://{tmp_path / 'storage'}", SPEFT_PORT=str(port))
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        process = spawn_cli(["run"], env, REPO, log)
        try:
            wait_ready(f"http://127.0.0.1:{port}", [process],
                       lambda: log_path.read_text(errors="replace"), timeout_s=120)
        finally:
            stop(process)


def test_make_run_hands_port_and_host_to_speft_run() -> None:
    def command(*variables: str) -> str:
        # as a user types it, not as a sub-make of `make test` (which adds "Leaving directory")
        env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
        dry_run = subprocess.run(["make", "--no-print-directory", "-n", "run", *variables],
                                 cwd=REPO, check=True, capture_output=True, text=True, env=env)
        return next(line.strip() for line in dry_run.stdout.splitlines() if " api.cli run" in line)

    assert command("PORT=8123", "HOST=127.0.0.2").endswith(
        "-m api.cli run --host 127.0.0.2 --port 8123")
    assert command().endswith("-m api.cli run")

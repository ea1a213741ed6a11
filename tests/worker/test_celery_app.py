"""A real Celery worker process consumes our messages over Redis and over the embedded broker;
`speft worker`'s processes (training worker, control worker, the beat it embeds) live no longer than
it and leave no schedule file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import redis

from api.core.config import Settings
from api.core.queue import RECONCILE_TASK, RUN_JOB_TASK, broker_url
from tests.fixtures.processes import kill, service_env, spawn_cli
from worker.celery_app import create_celery

REPO = Path(__file__).resolve().parents[2]
WORKER_START_TIMEOUT_S = 120.0
ORPHAN_TIMEOUT_S = 10.0

PROBE_MODULE = textwrap.dedent('''
    import os, pathlib
    from api.core.config import Settings
    from worker.celery_app import create_celery

    app = create_celery(Settings(database_url=os.environ["PROBE_DB"],
                                 broker_url=os.environ.get("PROBE_BROKER") or None,
                                 queue_prefix=os.environ["PROBE_QUEUE"]))

    @app.task(name="probe.touch")
    def touch(path):
        pathlib.Path(path).write_text(str(os.getpid()))
''')


def _redis_up() -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def test_reliability_settings():
    app = create_celery(Settings(database_url="sqlite:///./var/x.db"))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.task_ignore_result


def test_embedded_broker_sits_beside_the_sqlite_database(tmp_path):
    url = broker_url(Settings(database_url=f"sqlite:///{tmp_path}/db/speft.db"))
    assert url == f"sqla+sqlite:///{tmp_path}/db/broker.sqlite"
    assert broker_url(Settings(broker_url="redis://127.0.0.1:6379/3")) == "redis://127.0.0.1:6379/3"


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_worker_process_runs_a_task(tmp_path, monkeypatch, broker):
    if broker == "redis" and not _redis_up():
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not reachable on 127.0.0.1:6379 in CI")
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    (tmp_path / "probe_tasks.py").write_text(PROBE_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}",
           "PROBE_DB": f"sqlite:///{tmp_path}/speft.db",
           "PROBE_BROKER": "redis://127.0.0.1:6379/15" if broker == "redis" else "",
           "PROBE_QUEUE": f"probe-{uuid.uuid4().hex[:8]}-"}
    for key in ("PROBE_DB", "PROBE_BROKER", "PROBE_QUEUE"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.syspath_prepend(str(tmp_path))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "probe_tasks", "worker", "--pool", "solo",
         "-Q", env["PROBE_QUEUE"] + "cpu", "--loglevel", "WARNING", "--without-heartbeat",
         "--without-gossip", "--without-mingle"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import probe_tasks

        out = tmp_path / "touched"
        probe_tasks.touch.delay(str(out))
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
        assert out.exists(), "the worker did not run the task"
        assert int(out.read_text()) == worker.pid  # ran in the worker process, not here
    finally:
        worker.terminate()
        try:
            output = worker.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            worker.kill()
            output = worker.communicate()[0]
        sys.modules.pop("probe_tasks", None)
    assert "Traceback" not in (output or ""), output


def test_the_worker_app_consumes_every_task_name_the_api_sends():
    import worker.tasks  # noqa: F401 - registers the tasks on the worker's app
    from worker.celery_app import app

    assert {RUN_JOB_TASK, RECONCILE_TASK} <= set(app.tasks)
    assert app.conf.beat_schedule["speft-reconcile"]["task"] == RECONCILE_TASK


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(int(entry.name))[1:2] == [str(pid)]:
            children.append(int(entry.name))
    return children


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, …); [] once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped has exited)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, …)."""
    found = _children(pid)
    for child in list(found):
        found.extend(_descendants(child))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigkill_of_the_worker_main_process_leaves_nothing_behind(tmp_path: Path) -> None:
    """`speft worker` runs a training worker and a control worker (which embeds the beat) as
    its children; SIGKILL of the main process alone takes all three down, and no schedule file
    is left."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = service_env(SPEFT_DATABASE_URL=f"sqlite:///{tmp_path / 'speft.db'}",
                      SPEFT_STORAGE_URL=f"file://{tmp_path / 'storage'}",
                      SPEFT_QUEUE_PREFIX=f"beat-{uuid.uuid4().hex[:8]}-", TMPDIR=str(temp))
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = spawn_cli(["worker", "--device", "cpu"], env, tmp_path, log)
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while True:
            text = log_path.read_text(errors="replace")
            if all(line in text for line in ("beat: Starting", "speft-training@",
                                              "speft-control@")) and text.count(" ready.") == 2:
                break
            assert worker.poll() is None, f"speft worker exited:\n{text}"
            assert time.monotonic() < deadline, f"the workers did not start:\n{text}"
            time.sleep(0.2)
        tree = _descendants(worker.pid)  # training (solo pool), control, its beat
        assert len(tree) == 3, (tree, log_path.read_text())

        os.kill(worker.pid, signal.SIGKILL)  # the main process only, not its group
        worker.wait(timeout=10)
        deadline = time.monotonic() + ORPHAN_TIMEOUT_S
        while any(_running(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in tree if _running(pid)]
        assert not left, f"{left} outlived the worker:\n{log_path.read_text()}"
        assert not list(temp.glob("speft-beat*")), "the beat left a schedule file behind"
    finally:
        kill(worker)  # the whole group: whatever is left of it

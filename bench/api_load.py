"""API load: N concurrent clients create jobs, then poll job status, against a real `speft serve`.

Starts the API as a subprocess (`--workers` uvicorn processes) on a free loopback port with
local storage and, per `--backend`, either the embedded default (a fresh SQLite database and the
embedded broker) or production parts (a fresh PostgreSQL database on SPEFT_BENCH_POSTGRES, default
the local server, and the local Redis as broker, on a queue of its own that is deleted after).
Jobs are really enqueued; no worker runs, so they stay queued. Uploads one small training file,
then:
  1. create phase (closed loop, saturating): `--clients` concurrent clients each POST
     `--creates` jobs, each as soon as its previous one returned;
  2. poll phase (closed loop): the same clients GET random job ids for `--seconds` seconds;
  3. paced create phase (open loop): one create every 1/`--paced-rate` s, each timed from when
     it was due, for `--paced-seconds` s: latency at a fixed offered load below saturation.
Reports p50/p99 latency and requests/s per phase and writes bench/results/api_load_<backend>.json
(a short warm-up of two creates per client runs first, unmeasured).
The load generator (aiohttp, one process; httpx's client was the bottleneck at ~650 req/s)
shares the machine with the server (2 cores here): figures are a floor.

    .venv/bin/python bench/api_load.py [--backend embedded|postgres] [--workers 1]
                                       [--clients 16] [--creates 20] [--seconds 10]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import httpx
import psycopg
import redis
from probes import machine_info  # bench/probes.py

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TARGET_CREATE_P99_MS = 50.0
TARGET_POLLS_PER_S = 500.0

JOB_BODY = {
    "model": "minilm-l6",
    "method": {"type": "speft", "speft": {"metric": "gradient", "density": 0.01}},
    "hyperparameters": {"n_epochs": 1, "batch_size": 16},
}
SAMPLE = "".join(json.dumps({"text": f"sample sentence {i}", "label": ["neg", "pos"][i % 2]}) + "\n"
                 for i in range(64))


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def backend_env(backend: str, folder: Path) -> Iterator[dict[str, str]]:
    """SPEFT_* settings for `backend`; a Postgres database and Redis queue are removed after."""
    # Many jobs and polls from one tenant: no per-tenant rate limit or job quota.
    env = {"SPEFT_STORAGE_URL": f"file://{folder / 'storage'}", "SPEFT_API_KEYS": "",
           "SPEFT_RATE_LIMIT": "", "SPEFT_MAX_ACTIVE_JOBS_PER_TENANT": "0"}
    if backend == "embedded":
        yield {**env, "SPEFT_DATABASE_URL": f"sqlite:///{folder / 'speft.db'}"}
        return
    admin_url = os.environ.get("SPEFT_BENCH_POSTGRES",
                               f"postgresql://{getpass.getuser()}@127.0.0.1:5432/postgres")
    name = f"speft_bench_{uuid.uuid4().hex[:8]}"
    queue_prefix = f"bench-{name}-"
    broker = os.environ.get("SPEFT_BENCH_REDIS", "redis://127.0.0.1:6379/15")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    database_url = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield {**env, "SPEFT_DATABASE_URL": f"{database_url}/{name}",
               "SPEFT_BROKER_URL": broker, "SPEFT_QUEUE_PREFIX": queue_prefix}
    finally:
        redis.Redis.from_url(broker).delete(f"{queue_prefix}cpu")
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_server(folder: Path, port: int, settings: dict[str, str], workers: int) -> subprocess.Popen:
    """`speft serve` with `settings`; returns once /readyz is 200."""
    env = {**os.environ, **settings, "HF_HUB_OFFLINE": "1"}
    if "SPEFT_BROKER_URL" not in settings:
        env.pop("SPEFT_BROKER_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--workers", str(workers),
         "--no-access-log"], cwd=folder, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        time.sleep(0.3)
    server.kill()
    raise RuntimeError("the server did not become ready in 90 s")


def summarise(latencies_s: list[float], wall_s: float, errors: int) -> dict[str, float]:
    """p50/p99 in ms, requests per second, error count."""
    ms = sorted(x * 1000 for x in latencies_s)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))] if ms else float("nan")
    return {"requests": len(ms), "errors": errors, "p50_ms": statistics.median(ms) if ms else float("nan"),
            "p99_ms": p99, "requests_per_s": len(ms) / wall_s if wall_s else 0.0}


async def create_phase(base: str, file_id: str, clients: int, creates: int) -> tuple[dict, list[str]]:
    """Each client POSTs `creates` jobs; returns the summary and the created ids."""
    latencies: list[float] = []
    ids: list[str] = []
    errors = 0
    body = {**JOB_BODY, "training_file": file_id}

    async def client_loop(client: aiohttp.ClientSession) -> None:
        nonlocal errors
        for _ in range(creates):
            started = time.perf_counter()
            async with client.post(f"{base}/v1/fine_tuning/jobs", json=body) as resp:
                payload = await resp.json()
            latencies.append(time.perf_counter() - started)
            if resp.status == 201:
                ids.append(payload["id"])
            else:
                errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return summarise(latencies, wall, errors), ids


async def paced_create_phase(base: str, file_id: str, rate: float, seconds: float) -> dict:
    """Open loop: one create every 1/`rate` s for `seconds`, each timed from when it was due
    (so a stalled server is charged for the requests it delayed: no coordinated omission)."""
    latencies: list[float] = []
    errors = 0
    body = {**JOB_BODY, "training_file": file_id}

    async def one(client: aiohttp.ClientSession, due: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        async with client.post(f"{base}/v1/fine_tuning/jobs", json=body) as resp:
            await resp.read()
        latencies.append(time.perf_counter() - due)
        errors += resp.status != 201

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, started + i / rate)
                               for i in range(int(rate * seconds))))
        wall = time.perf_counter() - started
    return summarise(latencies, wall, errors)


async def poll_phase(base: str, ids: list[str], clients: int, seconds: float) -> dict:
    """Clients GET random jobs for `seconds`."""
    latencies: list[float] = []
    errors = 0
    rng = random.Random(0)

    async def client_loop(client: aiohttp.ClientSession, stop_at: float) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            async with client.get(f"{base}/v1/fine_tuning/jobs/{rng.choice(ids)}") as resp:
                await resp.read()
            latencies.append(time.perf_counter() - started)
            errors += resp.status != 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, started + seconds) for _ in range(clients)))
        wall = time.perf_counter() - started
    return summarise(latencies, wall, errors)


def main() -> None:
    """Run both phases and print/write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("embedded", "postgres"), default="embedded",
                        help="embedded: SQLite + embedded broker; postgres: PostgreSQL + Redis")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--creates", type=int, default=20, help="jobs created per client")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the poll phase")
    parser.add_argument("--paced-rate", type=float, default=100.0,
                        help="creates per second offered in the open-loop phase")
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default bench/results/api_load_<backend>.json)")
    args = parser.parse_args()
    args.out = args.out or RESULTS / f"api_load_{args.backend}.json"
    with (tempfile.TemporaryDirectory(prefix="speft-load-") as tmp,
          backend_env(args.backend, Path(tmp)) as settings):
        port = free_port()
        server = start_server(Path(tmp), port, settings, args.workers)
        base = f"http://127.0.0.1:{port}"
        try:
            upload = httpx.post(f"{base}/v1/files", data={"purpose": "fine-tune"},
                                files={"file": ("train.jsonl", SAMPLE.encode())}, timeout=30)
            upload.raise_for_status()
            asyncio.run(create_phase(base, upload.json()["id"], args.clients, 2))  # warm-up
            create, ids = asyncio.run(create_phase(base, upload.json()["id"], args.clients,
                                                   args.creates))
            poll = asyncio.run(poll_phase(base, ids, args.clients, args.seconds))
            paced = asyncio.run(paced_create_phase(base, upload.json()["id"], args.paced_rate,
                                                   args.paced_seconds))
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(
            libraries=(), server=f"speft serve ({args.workers} uvicorn process(es)), "
            + ("SQLite, embedded broker" if args.backend == "embedded"
               else "PostgreSQL, Redis broker")
            + ", local storage; load generator on the same machine"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "create": create, "poll": poll, "paced_create": paced,
        "targets": {"create_p99_ms_le": TARGET_CREATE_P99_MS, "polls_per_s_ge": TARGET_POLLS_PER_S},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| phase | requests | errors | p50 ms | p99 ms | requests/s |\n|---|---:|---:|---:|---:|---:|")
    for name, row in (("create job (closed loop)", create), ("poll status", poll),
                      (f"create job (open loop, {args.paced_rate:.0f}/s)", paced)):
        print(f"| {name} | {row['requests']} | {row['errors']} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} | {row['requests_per_s']:.0f} |")
    verdict = lambda ok: "PASS" if ok else "MISS"
    for name, row in (("closed loop", create), ("open loop", paced)):
        print(f"create p99 ({name}) {row['p99_ms']:.1f} ms (target <= "
              f"{TARGET_CREATE_P99_MS:.0f}): {verdict(row['p99_ms'] <= TARGET_CREATE_P99_MS)}")
    print(f"polls {poll['requests_per_s']:.0f}/s (target >= {TARGET_POLLS_PER_S:.0f}): "
          f"{verdict(poll['requests_per_s'] >= TARGET_POLLS_PER_S)}")


if __name__ == "__main__":
    main()

"""API load: N concurrent clients create jobs, then poll job status, against a real `speft serve`.

Starts the API as a subprocess (uvicorn, one process) on a free loopback port with a fresh
SQLite database, local storage and the embedded broker (jobs are really enqueued; no worker
runs, so they stay queued), uploads one small training file, then:
  1. create phase: `--clients` concurrent clients each POST `--creates` jobs;
  2. poll phase: the same clients GET random job ids for `--seconds` seconds.
Reports p50/p99 latency and requests/s per phase and writes bench/results/api_load.json.
The load generator shares the machine with the server (2 cores here): figures are a floor.

    .venv/bin/python bench/api_load.py [--clients 16] [--creates 20] [--seconds 10]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "api_load.json"
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


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """`speft serve` on a fresh SQLite database and local storage; returns once /readyz is 200."""
    env = {**os.environ, "SPEFT_DATABASE_URL": f"sqlite:///{folder / 'speft.db'}",
           "SPEFT_STORAGE_URL": f"file://{folder / 'storage'}", "SPEFT_API_KEYS": "",
           "HF_HUB_OFFLINE": "1"}
    env.pop("SPEFT_BROKER_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)], cwd=folder, env=env,
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
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))] if ms else float("nan")
    return {"requests": len(ms), "errors": errors, "p50_ms": statistics.median(ms) if ms else float("nan"),
            "p99_ms": p99, "requests_per_s": len(ms) / wall_s if wall_s else 0.0}


async def create_phase(base: str, file_id: str, clients: int, creates: int) -> tuple[dict, list[str]]:
    """Each client POSTs `creates` jobs; returns the summary and the created ids."""
    latencies: list[float] = []
    ids: list[str] = []
    errors = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for _ in range(creates):
            started = time.perf_counter()
            resp = await client.post("/v1/fine_tuning/jobs", json={**JOB_BODY, "training_file": file_id})
            latencies.append(time.perf_counter() - started)
            if resp.status_code == 201:
                ids.append(resp.json()["id"])
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return summarise(latencies, wall, errors), ids


async def poll_phase(base: str, ids: list[str], clients: int, seconds: float) -> dict:
    """Clients GET random jobs for `seconds`."""
    latencies: list[float] = []
    errors = 0
    rng = random.Random(0)

    async def client_loop(client: httpx.AsyncClient, stop_at: float) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            resp = await client.get(f"/v1/fine_tuning/jobs/{rng.choice(ids)}")
            latencies.append(time.perf_counter() - started)
            errors += resp.status_code != 200

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, started + seconds) for _ in range(clients)))
        wall = time.perf_counter() - started
    return summarise(latencies, wall, errors)


def main() -> None:
    """Run both phases and print/write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--creates", type=int, default=20, help="jobs created per client")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the poll phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="speft-load-") as tmp:
        port = free_port()
        server = start_server(Path(tmp), port)
        base = f"http://127.0.0.1:{port}"
        try:
            upload = httpx.post(f"{base}/v1/files", data={"purpose": "fine-tune"},
                                files={"file": ("train.jsonl", SAMPLE.encode())}, timeout=30)
            upload.raise_for_status()
            create, ids = asyncio.run(create_phase(base, upload.json()["id"], args.clients,
                                                   args.creates))
            poll = asyncio.run(poll_phase(base, ids, args.clients, args.seconds))
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "server": "speft serve (1 uvicorn process), SQLite, "
                    "local storage, embedded broker; load generator on the same machine"},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "create": create, "poll": poll,
        "targets": {"create_p99_ms_le": TARGET_CREATE_P99_MS, "polls_per_s_ge": TARGET_POLLS_PER_S},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| phase | requests | errors | p50 ms | p99 ms | requests/s |\n|---|---:|---:|---:|---:|---:|")
    for name, row in (("create job", create), ("poll status", poll)):
        print(f"| {name} | {row['requests']} | {row['errors']} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} | {row['requests_per_s']:.0f} |")
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    print(f"create p99 {create['p99_ms']:.1f} ms (target <= {TARGET_CREATE_P99_MS:.0f}): "
          f"{verdict(create['p99_ms'] <= TARGET_CREATE_P99_MS)}")
    print(f"polls {poll['requests_per_s']:.0f}/s (target >= {TARGET_POLLS_PER_S:.0f}): "
          f"{verdict(poll['requests_per_s'] >= TARGET_POLLS_PER_S)}")


if __name__ == "__main__":
    main()

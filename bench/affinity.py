"""Adapter affinity at the load balancer: 2 API processes, 200 adapters, with and without.

Each API process keeps its own adapter cache. With affinity (deploy/haproxy.cfg as it is: a
consistent hash of the adapter named in the body), each process sees only its share of the
adapters; without (the same file with `balance roundrobin` in the inference backend), each sees
all of them, and a cache that holds about 60% of them misses about 40% of the time.

Setup, once: a fresh embedded deployment (SQLite file and a storage folder, shared by both
processes; no worker) and --adapters MiniLM adapters (random 1% deltas with a 2-label head,
`speft_core.serving.random_delta`) recorded as succeeded jobs the way a worker leaves them.
A probe process loads one adapter to read its resident bytes; SPEFT_ADAPTER_CACHE_BYTES is set
to --cache-share of all adapters' bytes.
Per configuration: two fresh `speft serve` processes on loopback ports, haproxy (Debian's) in
front, then a closed workload of --clients concurrent clients sending the same seeded sequence
of one-sentence classification requests, each naming an adapter drawn uniformly at random: a
warm-up pass (--warmup requests, fills the caches), then --requests measured. Reported per
configuration: cache hits and misses of each process over the measured pass (from its own
/metrics), the hit rate, client-side p50 / p99 latency and requests/s; medians over --rounds
rounds of both configurations, their order rotated each round.

    .venv/bin/python bench/affinity.py [--adapters 200] [--requests 1000] [--clients 4]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from probes import machine_info  # bench/probes.py

MODEL = "minilm-l6"
LABELS = ("negative", "positive")
CONFIGS = ("affinity", "round-robin")
HIT = re.compile(r'^speft_adapter_cache_(hits|misses)_total\{model="minilm-l6"\} (\S+)$', re.MULTILINE)
RESIDENT = re.compile(r'^speft_adapter_resident_bytes\{model="minilm-l6"\} (\S+)$', re.MULTILINE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_env(folder: Path, cache_bytes: int) -> dict[str, str]:
    """The embedded deployment both API processes share."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEFT_")}
    env.update(SPEFT_DATABASE_URL=f"sqlite:///{folder / 'speft.db'}",
               SPEFT_STORAGE_URL=f"file://{folder / 'storage'}", SPEFT_BROKER_URL="",
               SPEFT_API_KEYS="", SPEFT_RATE_LIMIT="", SPEFT_ADAPTER_CACHE_BYTES=str(cache_bytes),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


@contextmanager
def process(command: list[str], env: dict[str, str], log: Path, ready_url: str | None
            ) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, stopped afterwards; waits for `ready_url` to answer 200 when given."""
    with log.open("wb") as handle:
        child = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                 cwd=log.parent)
        try:
            deadline = time.monotonic() + 120
            while ready_url is not None:
                if child.poll() is not None:
                    raise RuntimeError(f"{command[:3]} exited:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ready_url} not ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield child
        finally:
            child.terminate()
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()


def api_process(env: dict[str, str], folder: Path, name: str) -> tuple[Any, str]:
    """(context manager, base url) of one `speft serve`."""
    port = free_port()
    speft = str(Path(sys.executable).with_name("speft"))
    url = f"http://127.0.0.1:{port}"
    return process([speft, "serve", "--port", str(port)], env, folder / f"{name}.log",
                   f"{url}/healthz"), url


def seed_adapters(folder: Path, count: int) -> list[str]:
    """`count` succeeded jobs with random MiniLM adapters, recorded as a worker records them."""
    from fastapi.testclient import TestClient

    from api.core.config import Settings
    from api.main import create_app
    from api.services.jobs import claim_job, finish_succeeded
    from speft_core.delta import delta_to_bytes
    from speft_core.models import bundled_minilm_path, load_model
    from speft_core.serving import random_delta

    settings = Settings(database_url=f"sqlite:///{folder / 'speft.db'}",
                        storage_url=f"file://{folder / 'storage'}", api_keys="", rate_limit="")
    model = load_model(bundled_minilm_path(), "classification", labels=list(LABELS))
    sample = "".join(json.dumps({"text": f"s {i}", "label": LABELS[i % 2]}) + "\n"
                     for i in range(8)).encode()
    ids = []
    with TestClient(create_app(settings)) as client:
        client.app.state.enqueue_job = lambda job_id, device: None  # no worker: never sent
        file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", sample)}).json()["id"]
        for i in range(count):
            job_id = client.post("/v1/fine_tuning/jobs", json={
                "model": MODEL, "training_file": file_id}).json()["id"]
            adapter_id = f"adapter-{job_id.removeprefix('ftjob-')}"
            delta = random_delta(model, density=0.01, seed=1000 + i, labels=LABELS,
                                 base_model=MODEL)
            data = delta_to_bytes(delta)
            key = f"adapters/{adapter_id}.safetensors"
            stored = client.app.state.storage.put(key, data)
            with client.app.state.sessions.begin() as session:
                claim_job(session, job_id=job_id, worker="bench")
                finish_succeeded(session, job_id=job_id, adapter_id=adapter_id,
                                 storage_key=key, nnz=delta.nnz, density=0.01, metric="random",
                                 bytes=stored.size, sha256=hashlib.sha256(data).hexdigest(),
                                 eval={}, trainable_params=delta.nnz)
            ids.append(adapter_id)
    return ids


def classify(client: httpx.Client, adapter: str, text: str) -> float:
    """One request's latency in seconds."""
    started = time.perf_counter()
    response = client.post("/v1/classifications",
                           json={"model": MODEL, "adapter": adapter, "input": text})
    response.raise_for_status()
    return time.perf_counter() - started


def run_pass(url: str, requests: Sequence[tuple[str, str]], clients: int) -> dict[str, Any]:
    """The requests over `clients` concurrent connections; latencies and wall time."""
    pools = [httpx.Client(base_url=url, timeout=120) for _ in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as executor:
        latencies = list(executor.map(
            lambda item: classify(pools[item[0] % clients], *item[1]), enumerate(requests)))
    wall = time.perf_counter() - started
    for pool in pools:
        pool.close()
    ordered = sorted(latencies)
    return {"requests": len(requests), "wall_s": wall, "requests_per_s": len(requests) / wall,
            "p50_ms": 1e3 * statistics.median(ordered),
            "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def cache_counts(url: str) -> dict[str, float]:
    """This process's adapter cache hits and misses so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts = {"hits": 0.0, "misses": 0.0}
    counts.update({kind: float(value) for kind, value in HIT.findall(text)})
    return counts


def haproxy_config(config: str, servers: Sequence[str], port: int) -> str:
    """deploy/haproxy.cfg on loopback: its server templates become `servers`, it binds `port`;
    for round robin, the inference backend's hash becomes `balance roundrobin`."""
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    lines = "\n".join(f"    server api{i} {s.removeprefix('http://')} check"
                      for i, s in enumerate(servers, 1))
    text = re.sub(r"^\s*server-template .*$", lines, text, flags=re.MULTILINE)
    text = text.replace("bind :8000", f"bind 127.0.0.1:{port}")
    if config == "round-robin":
        assert "balance hash var(txn.adapter)" in text
        text = text.replace("balance hash var(txn.adapter)", "balance roundrobin")
    return text


def measure(config: str, args: argparse.Namespace, folder: Path, env: dict[str, str],
            workload: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """One configuration on two fresh API processes behind a fresh haproxy."""
    with ExitStack() as stack:
        urls = []
        for index in range(2):
            manager, url = api_process(env, folder, f"{config}-api{index + 1}")
            stack.enter_context(manager)
            urls.append(url)
        port = free_port()
        cfg = folder / f"haproxy-{config}.cfg"
        cfg.write_text(haproxy_config(config, urls, port))
        stack.enter_context(process(["haproxy", "-db", "-f", str(cfg)], env,
                                    folder / f"haproxy-{config}.log",
                                    f"http://127.0.0.1:{port}/healthz"))
        time.sleep(2.5)  # both servers through their first health check
        lb = f"http://127.0.0.1:{port}"
        warmup = run_pass(lb, workload["warmup"], args.clients)
        before = [cache_counts(u) for u in urls]
        measured = run_pass(lb, workload["measured"], args.clients)
        after = [cache_counts(u) for u in urls]
    per_process = [{k: a[k] - b[k] for k in ("hits", "misses")} for a, b in zip(after, before)]
    hits = sum(p["hits"] for p in per_process)
    misses = sum(p["misses"] for p in per_process)
    return {"config": config, "warmup": warmup, **measured, "per_process": per_process,
            "hits": hits, "misses": misses, "hit_rate": hits / max(1.0, hits + misses)}


def summary(config: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over a configuration's rounds."""
    keys = ("hit_rate", "hits", "misses", "p50_ms", "p99_ms", "requests_per_s")
    return {"config": config, "rounds": len(runs),
            **{k: statistics.median(r[k] for r in runs) for k in keys}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=600)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of both configurations (order rotated); medians reported")
    parser.add_argument("--cache-share", type=float, default=0.6,
                        help="each process's cache budget, as a share of all adapters' bytes")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "SPEFT_DATA_DIR", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "affinity.json")
    args = parser.parse_args(argv)
    if shutil.which("haproxy") is None:
        parser.error("haproxy not found (apt-get install haproxy)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speft-affinity-") as tmp:
        folder = Path(tmp)
        (folder / "storage").mkdir()
        adapters = seed_adapters(folder, args.adapters)
        manager, url = api_process(service_env(folder, 2**34), folder, "probe")
        with manager:  # one adapter's resident bytes
            httpx.post(f"{url}/v1/classifications", timeout=120, json={
                "model": MODEL, "adapter": adapters[0], "input": "probe"}).raise_for_status()
            per_adapter = float(RESIDENT.search(httpx.get(f"{url}/metrics").text).group(1))
        budget = int(args.cache_share * per_adapter * len(adapters))
        with (args.data_dir / "sst2" / "dev.jsonl").open() as handle:
            texts = [json.loads(line)["text"] for line in handle if line.strip()]
        draw = random.Random(0)
        workload = {phase: [(draw.choice(adapters), draw.choice(texts)) for _ in range(n)]
                    for phase, n in (("warmup", args.warmup), ("measured", args.requests))}
        env = service_env(folder, budget)
        runs = []
        for round_index in range(args.rounds):
            order = CONFIGS if round_index % 2 == 0 else tuple(reversed(CONFIGS))
            runs += [{"round": round_index, **measure(config, args, folder, env, workload)}
                     for config in order]
        rows = [summary(config, [r for r in runs if r["config"] == config])
                for config in CONFIGS]
    report = {"machine": machine_info(args, libraries=("transformers",)),
              "adapters": len(adapters), "adapter_resident_bytes": per_adapter,
              "cache_budget_bytes": budget, "cache_share": args.cache_share,
              "clients": args.clients, "rounds": args.rounds, "results": rows, "runs": runs,
              "wall_s": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("| configuration | hit rate | hits / misses | p50 (ms) | p99 (ms) | requests/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['hit_rate']:.1%} | {r['hits']:.0f} / {r['misses']:.0f} "
              f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests_per_s']:.1f} |")
    print(f"wall {report['wall_s']:.0f} s; results in {args.out}")
    return report


if __name__ == "__main__":
    main()

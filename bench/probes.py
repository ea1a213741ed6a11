"""What every benchmark measures besides its subject: peak memory, how busy the machine was with
other processes, and which machine and libraries a figure came from.

One module for all scripts (train_step, serve, quality, api_load), so every JSON result
describes its machine the same way and memory is probed one way.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


# --- memory --------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size now, in bytes (/proc/self/statm, second field)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ru_maxrss() -> int:
    """getrusage's peak RSS in bytes (kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm() -> int | None:
    """VmHWM (the resettable RSS high-water mark) in bytes, None where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory increase over a baseline taken at `start()`, per device kind."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0
        self.maxrss_before = 0
        self.hwm_reset = False

    def start(self) -> None:
        """Take the baseline and reset the high-water marks."""
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        self.baseline = current_rss()
        self.maxrss_before = ru_maxrss()
        self.hwm_reset = reset_hwm()

    def result(self) -> dict[str, Any]:
        """Peak increase in MiB, with the cross-checks and whether the figure is trustworthy."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - self.baseline
            return {"peak_mem_mib": peak / MIB, "peak_mem_source": "cuda.max_memory_allocated",
                    "peak_mem_reliable": True}
        hwm = vm_hwm()
        maxrss_increase = (ru_maxrss() - self.baseline) / MIB
        if self.hwm_reset and hwm is not None:
            peak, source, reliable = (hwm - self.baseline) / MIB, "VmHWM (reset)", True
        else:
            peak, source = maxrss_increase, "ru_maxrss"
            reliable = self.maxrss_before <= self.baseline
        return {"peak_mem_mib": peak, "peak_mem_source": source, "peak_mem_reliable": reliable,
                "ru_maxrss_increase_mib": maxrss_increase, "baseline_rss_mib": self.baseline / MIB}


# --- contention: how busy the machine was with other processes while we timed -------------


def system_busy_seconds() -> float:
    """CPU-seconds all processes on the machine have been busy since boot (/proc/stat); 0 where
    it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


class LoadProbe:
    """Cores used by this process and by everything else since construction (wall average)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.own = time.process_time()
        self.busy = system_busy_seconds()

    def result(self) -> dict[str, float]:
        """Average cores busy for us (`own_cores`) and for other processes (`other_cores`)."""
        wall = time.perf_counter() - self.wall
        own = time.process_time() - self.own
        busy = system_busy_seconds() - self.busy
        if wall <= 0:
            return {"own_cores": 0.0, "other_cores": 0.0}
        return {"own_cores": own / wall, "other_cores": max(0.0, busy - own) / wall}

    def other_cores(self) -> float:
        """Cores busy for everything but this process, averaged over the wall time."""
        return self.result()["other_cores"]


# --- the machine ---------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' where absent)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def machine_info(args: argparse.Namespace | None = None, *, threads: int | None = None,
                 libraries: tuple[str, ...] = ("transformers", "peft"),
                 **extra: Any) -> dict[str, Any]:
    """CPU, cores, library versions, torch threads, GPU (when the run is on CUDA), date, the
    script's arguments and any `extra` fields, in one shape for every benchmark."""
    device = getattr(args, "device", "cpu") if args is not None else "cpu"
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        **{name: _version(name) for name in libraries},
        "python": platform.python_version(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "device": device,
        "gpu": (torch.cuda.get_device_name()
                if device == "cuda" and torch.cuda.is_available() else None),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }
    if args is not None:
        info["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                        if k not in ("method", "json", "masks")}
    return info

"""The CPU kernel's build survives a killed builder, waits a bounded time for a live one, and is
never shared between different sources or environments (real processes, real compiler)."""
from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speft_core import kernels
from speft_core.kernels.build import (
    KernelBuildTimeout,
    build_folder,
    build_key,
    build_lock,
    load_extension,
)
from tests.fixtures.processes import kill, service_env

# Builds the real kernel, then checks it against a dense product.
LOAD_KERNEL = """
import torch
from speft_core.kernels import SparsePattern, load_cpu_extension, sampled_grad
ext = load_cpu_extension()
print("kernel", ext is not None, flush=True)
g, x = torch.randn(5, 6), torch.randn(5, 7)
pattern = SparsePattern.from_indices(torch.tensor([0, 9, 40]), (6, 7))
got = sampled_grad(g, x, pattern)
assert torch.allclose(got, (g.t() @ x).reshape(-1)[pattern.indices], atol=1e-5)
"""
TINY_SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return %d; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def _kernel_env(root: Path, **extra: str) -> dict[str, str]:
    # TORCH_EXTENSIONS_DIR too: a build through torch's own cache lands in the fresh root as well
    return service_env(SPEFT_KERNEL_CACHE_DIR=str(root), **extra) | {
        "TORCH_EXTENSIONS_DIR": str(root)}


def _tiny(folder: Path, answer: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "tiny.cpp"
    source.write_text(TINY_SOURCE % answer)
    return source


@pytest.mark.slow
def test_a_builder_killed_mid_build_does_not_block_the_next_load(tmp_path):
    """SIGKILL a process (and its compilers) while it builds the kernel: a new process still
    builds and loads it, in bounded time, and the dead builder's temporary is cleaned up."""
    root = tmp_path / "kernels"
    env = _kernel_env(root)
    builder = subprocess.Popen([sys.executable, "-c", LOAD_KERNEL], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(root.rglob("build.ninja")):  # the compilers are about to start
        assert builder.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.1)
    time.sleep(3)
    assert builder.poll() is None, "the build finished before it could be killed"
    kill(builder)

    started = time.monotonic()
    try:
        after = subprocess.run([sys.executable, "-c", LOAD_KERNEL], env=env, capture_output=True,
                               text=True, timeout=400, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the load after a killed builder hung (a stale build lock blocks it)")
    assert after.returncode == 0, after.stderr
    assert "kernel True" in after.stdout, after.stderr  # built, not the fallback
    folder = build_folder(kernels._EXTENSION, kernels._SOURCES, cflags=kernels._CFLAGS,
                          ldflags=kernels._LDFLAGS, root=root)
    assert list(folder.glob("*.so")) and not list(root.glob(".*.build-*"))
    # published: the next process imports it without building (well under a build's time)
    again = subprocess.run([sys.executable, "-c", LOAD_KERNEL], env=env, capture_output=True,
                           text=True, timeout=60, check=False)
    assert "kernel True" in again.stdout, again.stderr
    print(f"rebuilt after the kill in {time.monotonic() - started:.0f} s")


def test_a_live_builder_is_waited_for_a_bounded_time_then_the_kernel_falls_back(tmp_path):
    """While another live process holds the build lock, a load waits SPEFT_KERNEL_BUILD_WAIT_S,
    then says who holds it and runs on the fallback (sampled_addmm), correctly."""
    root = tmp_path / "kernels"
    folder = build_folder(kernels._EXTENSION, kernels._SOURCES, cflags=kernels._CFLAGS,
                          ldflags=kernels._LDFLAGS, root=root)
    with build_lock(folder.with_name(folder.name + ".lock"), wait_s=0):
        started = time.monotonic()
        waiter = subprocess.run([sys.executable, "-c", LOAD_KERNEL], capture_output=True,
                                text=True, timeout=120, check=False,
                                env=_kernel_env(root, SPEFT_KERNEL_BUILD_WAIT_S="1"))
        waited = time.monotonic() - started
    assert waiter.returncode == 0, waiter.stderr
    assert "kernel False" in waiter.stdout
    assert "kernel build lock" in waiter.stderr and "SPEFT_KERNEL_BUILD_WAIT_S" in waiter.stderr
    assert waited < 60  # bounded: one second of waiting plus the interpreter's start


def test_the_wait_names_the_holder_and_ends(tmp_path):
    lock = tmp_path / "x.lock"
    with build_lock(lock, wait_s=0):
        started = time.monotonic()
        with (pytest.raises(KernelBuildTimeout, match=r"pid \d+ .*x\.lock.*over 0 s"),
              build_lock(lock, wait_s=0.3)):
            pass
        assert time.monotonic() - started < 5
    with (build_lock(lock, wait_s=0),  # released: taken at once
          open(lock) as other, pytest.raises(BlockingIOError)):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_builds_of_different_sources_or_environments_never_share_a_folder(tmp_path, monkeypatch):
    """Two checkouts with different kernel sources, or two environments, each get their own
    published build; loading one never rebuilds or replaces the other."""
    root = tmp_path / "kernels"
    one, two = _tiny(tmp_path / "checkout-1", 1), _tiny(tmp_path / "checkout-2", 2)
    first = load_extension("tiny", [one], root=root)
    second = load_extension("tiny", [two], root=root)
    assert (first.answer(), second.answer()) == (1, 2)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(folders) == 2
    built = {p: p.stat().st_mtime_ns for p in folders}
    again = load_extension("tiny", [_tiny(tmp_path / "checkout-3", 1)], root=root)
    assert again.answer() == 1  # same content elsewhere: the published build, not a rebuild
    assert {p: p.stat().st_mtime_ns for p in folders} == built

    key = build_key([one], [])
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    assert build_key([one], []) != key  # another environment: another folder
    monkeypatch.undo()
    monkeypatch.setattr(kernels.build.torch, "__version__", "0.0.0")
    assert build_key([one], []) != key
    monkeypatch.undo()
    monkeypatch.setattr(kernels.build, "_cpu_flags", lambda: "flags : sse2")
    assert build_key([one], []) != key
    monkeypatch.undo()
    assert build_key([one], []) == key and build_key([one], ["-O2"]) != key

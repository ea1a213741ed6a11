"""Build a C++ extension once per source, environment and CPU; a killed builder blocks nobody.

`torch.utils.cpp_extension.load` guards its build folder with a lock file (FileBaton) that a
SIGKILLed builder leaves behind, so every later load waits on it forever; and it names the folder
by the extension alone, so two checkouts or environments share one folder and rebuild it in turn.
`load_extension` instead:

- keys the folder `<cache root>/<name>_<key>` by a hash of the sources, the flags, the torch
  version and C++ ABI, the Python ABI, the environment (`sys.prefix`, resolved) and the CPU
  (machine and `/proc/cpuinfo` flags), so a build is only ever reused where it was made for;
- takes an `fcntl.flock` on `<folder>.lock` to build (the OS drops it when its holder dies, also
  on SIGKILL), builds in a private temporary folder and publishes it by one atomic rename: the
  folder exists only complete, and a killed builder leaves a temporary that the next removes;
- waits at most `wait_s` for a live builder, then raises `KernelBuildTimeout` naming it.

The cache root is `$SPEFT_KERNEL_CACHE_DIR`, else `$XDG_CACHE_HOME/speft/kernels`, else
`~/.cache/speft/kernels`; `$SPEFT_KERNEL_BUILD_WAIT_S` (default 600) bounds the wait.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "SPEFT_KERNEL_CACHE_DIR"
WAIT_ENV = "SPEFT_KERNEL_BUILD_WAIT_S"
DEFAULT_WAIT_S = 600.0
_POLL_S = 0.2


class KernelBuildTimeout(RuntimeError):
    """Another live process held the build lock for longer than the wait allowed."""


def cache_root() -> Path:
    """Where built extensions live: $SPEFT_KERNEL_CACHE_DIR, else the user's cache folder."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "speft" / "kernels"


def build_wait_s() -> float:
    """Seconds to wait for another process's build: $SPEFT_KERNEL_BUILD_WAIT_S, else 600."""
    value = os.environ.get(WAIT_ENV, "").strip()
    try:
        return float(value) if value else DEFAULT_WAIT_S
    except ValueError:
        log.warning("speft: %s=%r is not a number of seconds; waiting %.0f s", WAIT_ENV, value,
                    DEFAULT_WAIT_S)
        return DEFAULT_WAIT_S


def _cpu_flags() -> str:
    """The CPU's feature flags (a build with -march=native runs only where they match)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def build_key(sources: Sequence[Path], flags: Sequence[str]) -> str:
    """Hash of everything a built extension depends on: sources, flags, torch, Python, env, CPU."""
    key = hashlib.sha256()
    for source in sources:
        key.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    parts = [" ".join(flags), torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI),
             sys.version, sys.implementation.cache_tag or "",
             str(sysconfig.get_config_var("EXT_SUFFIX")), os.path.realpath(sys.prefix),
             os.environ.get("CXX", "c++"), platform.machine(), platform.processor(), _cpu_flags()]
    key.update("\0".join(parts).encode())
    return key.hexdigest()[:16]


def _import_built(folder: Path) -> ModuleType | None:
    """The extension published in `folder` (its one shared library), or None if there is none."""
    libraries = sorted(folder.glob("*.so")) if folder.is_dir() else []
    if not libraries:
        return None
    spec = importlib.util.spec_from_file_location(libraries[0].stem, libraries[0])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def build_lock(lock_path: Path, *, wait_s: float) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (released by the OS if this process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise KernelBuildTimeout(
                        f"another process ({holder}) has held the kernel build lock {lock_path} "
                        f"for over {wait_s:.0f} s; it is still building (a dead one would have "
                        f"released it). Wait for it, stop it, or raise {WAIT_ENV}") from None
                time.sleep(_POLL_S)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {platform.node()}, since {time.ctime()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_folder(name: str, sources: Sequence[Path], *, cflags: Sequence[str] = (),
                 ldflags: Sequence[str] = (), root: Path | None = None) -> Path:
    """The folder the extension built from these sources and flags is published in, here."""
    root = root if root is not None else cache_root()
    return root / f"{name}_{build_key(sources, [*cflags, '|', *ldflags])}"


def load_extension(name: str, sources: Sequence[Path], *, cflags: Sequence[str] = (),
                   ldflags: Sequence[str] = (), root: Path | None = None,
                   wait_s: float | None = None) -> ModuleType:
    """Import the extension built for these sources here; build and publish it first if needed."""
    folder = build_folder(name, sources, cflags=cflags, ldflags=ldflags, root=root)
    root = folder.parent
    module = _import_built(folder)  # published folders are complete: no lock needed to read
    if module is not None:
        return module
    with build_lock(folder.with_name(folder.name + ".lock"),
                    wait_s=build_wait_s() if wait_s is None else wait_s):
        module = _import_built(folder)  # another process built it while this one waited
        if module is not None:
            return module
        for stale in root.glob(f".{folder.name}.build-*"):  # only dead builders leave these
            shutil.rmtree(stale, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=root))
        try:
            from torch.utils.cpp_extension import load

            started = time.perf_counter()
            module = load(name=folder.name, sources=[str(source) for source in sources],
                          extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                          build_directory=str(building), verbose=False)
            os.rename(building, folder)  # atomic publish; the loaded library stays mapped
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        log.info("speft: built extension %s in %.0f s", folder, time.perf_counter() - started)
        return module

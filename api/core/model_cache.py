"""Stored base models: a tar archive in object storage, materialised once as a local HF folder.

A model registered with `speft models register --storage-key` is a tar archive (plain or
compressed) of a HF model folder: config.json, *.safetensors and tokenizer files at the archive
root, or inside its single top-level folder. `local_model_folder` unpacks it into
`cache_dir/<sha256>` the first time and returns that folder afterwards. The archive is verified
against the registered sha256 on download, unpacked with tarfile's "data" filter after every
member was checked (no absolute or `..` names, no devices, a cap on the unpacked size), into a
temp folder inside `cache_dir`; the model's folder there, once each of its symlinks is found to
point to a file inside it, is renamed into place: a cache folder is complete or absent, and of
processes unpacking the same archive together one wins and the others discard theirs.
"""
from __future__ import annotations

import logging
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from api.core.storage import ChecksumMismatch, ObjectNotFound, Storage
from speft_core.errors import ModelLoadError

log = logging.getLogger(__name__)

GiB = 1024 ** 3
DEFAULT_MAX_UNPACKED_BYTES = 20 * GiB
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TEMP_PREFIX = ".unpack-"
# What a corrupt or truncated archive raises while it is read; decompressors also raise OSErrors
# without an errno (gzip.BadGzipFile, bz2's "Invalid data stream"), told apart from disk errors.
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


class ModelArchiveError(ModelLoadError):
    """A stored model archive is missing, changed, corrupt, unsafe, too large or not a HF folder."""

    code = "invalid_model_archive"

    def __init__(self, message: str, *, storage_key: str) -> None:
        super().__init__(message, param="model")
        self.storage_key = storage_key


def local_model_folder(storage: Storage, *, storage_key: str, sha256: str, cache_dir: Path,
                       max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> Path:
    """The HF model folder of the archive at `storage_key`: `cache_dir/<sha256>`, unpacked once."""
    final = _cached_folder(cache_dir, sha256)
    if final.is_dir():
        return final
    try:
        with storage.open_local(storage_key, sha256=sha256) as archive:
            return cache_archive(archive, storage_key=storage_key, sha256=sha256,
                                 cache_dir=cache_dir, max_unpacked_bytes=max_unpacked_bytes)
    except ObjectNotFound:
        raise ModelArchiveError(f"model archive {storage_key} is not in storage",
                                storage_key=storage_key) from None
    except ChecksumMismatch as err:
        raise ModelArchiveError(f"model archive {storage_key} changed since it was "
                                f"registered: {err.message}", storage_key=storage_key) from err


def cache_archive(archive: Path, *, storage_key: str, sha256: str, cache_dir: Path,
                  max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> Path:
    """Unpack the local `archive` (whose sha256 is `sha256`, from `storage_key`) into
    `cache_dir/<sha256>` unless it is there already; that folder."""
    final = _cached_folder(cache_dir, sha256)
    if final.is_dir():
        return final
    unpack_dir = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=cache_dir))
    try:
        os.chmod(unpack_dir, 0o755)
        _unpack(archive, unpack_dir, storage_key=storage_key,
                max_unpacked_bytes=max_unpacked_bytes)
        root = _model_root(unpack_dir)
        if root is None:
            raise ModelArchiveError(
                f"model archive {storage_key} has no config.json at its root or in its single "
                "top-level folder", storage_key=storage_key)
        _check_links(root, storage_key=storage_key)
        try:
            os.rename(root, final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("speft.model_cache lost unpack race key=%s sha256=%s", storage_key, sha256)
        else:
            log.info("speft.model_cache unpacked key=%s sha256=%s", storage_key, sha256)
        return final
    finally:
        shutil.rmtree(unpack_dir, ignore_errors=True)


def _cached_folder(cache_dir: Path, sha256: str) -> Path:
    """`cache_dir/<sha256>` (the cache folder is created), after checking the digest is one: it
    becomes a path."""
    if not SHA256_RE.match(sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / sha256


def _unpack(archive: Path, target: Path, *, storage_key: str, max_unpacked_bytes: int) -> None:
    """Check every member of the tar archive, then extract it into `target` with the data filter."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            _check_members(members, storage_key=storage_key, max_unpacked_bytes=max_unpacked_bytes)
            tar.extractall(target, members=members, filter="data")
    except ModelArchiveError:
        raise
    except tarfile.FilterError as err:  # a link out of the folder, say
        raise ModelArchiveError(f"model archive {storage_key} has an unsafe member: {err}",
                                storage_key=storage_key) from err
    except OSError as err:
        if err.errno is not None:  # the disk, not the archive (ENOSPC, EACCES, ...)
            raise
        raise ModelArchiveError(f"model archive {storage_key} is corrupt: {err}",
                                storage_key=storage_key) from err
    except _CORRUPT as err:
        raise ModelArchiveError(f"model archive {storage_key} is not a readable tar archive: "
                                f"{err}", storage_key=storage_key) from err


def _check_members(members: list[tarfile.TarInfo], *, storage_key: str,
                   max_unpacked_bytes: int) -> None:
    """Refuse absolute or `..` names, special files, and archives unpacking past the limit."""
    if not members:
        raise ModelArchiveError(f"model archive {storage_key} is empty", storage_key=storage_key)
    total = 0
    for member in members:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise ModelArchiveError(f"model archive {storage_key} has an unsafe member name "
                                    f"{member.name!r}", storage_key=storage_key)
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise ModelArchiveError(f"model archive {storage_key} has a special file "
                                    f"{member.name!r}", storage_key=storage_key)
        total += member.size if member.isfile() else 0
        if total > max_unpacked_bytes:
            raise ModelArchiveError(f"model archive {storage_key} unpacks to more than "
                                    f"{max_unpacked_bytes} bytes", storage_key=storage_key)


def _check_links(root: Path, *, storage_key: str) -> None:
    """Refuse a symlink whose target is absolute, climbs out of `root` by name, or does not end
    at a file inside `root`. The data filter keeps links inside the temp folder only; once `root`
    is renamed to `cache_dir/<sha256>`, `../<other sha256>/x` would reach another model's
    folder. Checked by name, a link means the same after the rename; followed (links to folders
    refused), no link climbs out through another."""
    real_root = root.resolve()
    for folder, subfolders, files in os.walk(root):  # links to folders are listed, not entered
        for name in (*subfolders, *files):
            link = Path(folder, name)
            if not link.is_symlink():
                continue
            target = PurePosixPath(os.readlink(link))
            inside = os.path.normpath(link.parent.relative_to(root) / target)
            resolved = Path(os.path.realpath(link))  # a link loop resolves to no file
            if (target.is_absolute() or inside == ".." or inside.startswith("../")
                    or not resolved.is_relative_to(real_root) or not resolved.is_file()):
                raise ModelArchiveError(
                    f"model archive {storage_key} has a link {link.relative_to(root)} -> "
                    f"{target} that is not a file inside the model's folder",
                    storage_key=storage_key)


def _model_root(folder: Path) -> Path | None:
    """`folder` if it holds config.json, else its single subfolder that does; None otherwise."""
    if (folder / "config.json").is_file():
        return folder
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0] if (entries[0] / "config.json").is_file() else None
    return None


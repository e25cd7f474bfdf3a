"""Writing files and directories so that readers see the old version or the complete new one.

Every writer in anim_jax goes through here: the data go to a temporary name in the target's own
directory (same filesystem, so the rename is atomic), are fsynced, and are renamed over the
target; the directory is fsynced so the rename survives a crash. A failed write removes its
temporary file or directory and leaves the target as it was.

Files get the mode an ordinary ``open(path, "w")`` gives them (0o666 minus the umask: 0644 under
umask 022) and directories that of ``mkdir`` (0o777 minus the umask: 0755). ``tempfile.mkstemp`` /
``mkdtemp`` would create them owner-only (0600 / 0700), and that mode survives the rename, so the
temporary names are made here with ``os.open(..., 0o666)`` / ``os.mkdir(..., 0o777)``, which the
kernel masks with the umask.

Where the target is a URL (``gs://...``, see :mod:`anim_jax.storage`), the file or directory is
staged in a local temporary place and uploaded when the block completes: a file as one object
(visible complete or not at all), a directory file by file with its commit marker last
(``storage.upload_tree``); object stores have no rename.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
import tempfile
from typing import Callable, Iterator

from anim_jax import storage

PathLike = str | os.PathLike

__all__ = ["atomic_dir", "atomic_file", "atomic_open", "fsync_dir", "replace_dir", "write_bytes", "write_text", "write_with"]


def fsync_dir(folder: PathLike) -> None:
    """Makes a rename inside ``folder`` durable (a no-op where directories cannot be fsynced)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: pathlib.Path, kind: str) -> pathlib.Path:
    # The target's suffix stays last, for writers that pick a format from the name (PIL, PyAV).
    return path.parent / f".{path.stem}.{kind}-{secrets.token_hex(6)}{path.suffix}"


def _remove(path: pathlib.Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path (an empty file with ordinary permissions) beside ``path``; once the
    block has written it, it is fsynced and renamed to ``path``. On an exception it is removed."""
    if storage.is_url(path):
        with _staged_file(path) as tmp:
            yield tmp
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _staged_file(url) -> Iterator[pathlib.Path]:
    name = storage.as_path(url).name
    folder = tempfile.mkdtemp(prefix="anim-jax-upload-")
    try:
        tmp = pathlib.Path(folder) / name  # same name: writers pick the format from the suffix
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
        yield tmp
        storage.upload_file(tmp, url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", **kwargs):
    """``open(path, mode)`` whose file appears under ``path`` only when the block completes."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes new files; mode {mode!r} is not a write mode")
    with atomic_file(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def replace_dir(new: PathLike, out: PathLike) -> None:
    """Moves the complete directory ``new`` to ``out``. An existing ``out`` is moved aside first and
    removed after, so ``out`` is always either the old or the new directory. For a URL ``out`` the
    old objects are removed (commit marker first) and the new ones uploaded (commit marker last)."""
    if storage.is_url(out):
        storage.upload_tree(new, out)
        _remove(pathlib.Path(new))
        return
    new, out = pathlib.Path(new), pathlib.Path(out)
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(old, out)
            raise
        _remove(old)
    else:
        os.replace(new, out)
    fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_dir(out: PathLike) -> Iterator[pathlib.Path]:
    """Yields an empty temporary directory (ordinary permissions) beside ``out``; when the block
    completes it replaces ``out`` (see :func:`replace_dir`). On an exception it is removed and
    ``out`` is untouched."""
    if storage.is_url(out):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="anim-jax-upload-"))
        try:
            yield tmp
            replace_dir(tmp, out)
        finally:
            _remove(tmp)
        return
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def write_with(path: PathLike, write: Callable[[pathlib.Path], object]) -> None:
    """``write(tmp)`` fills a temporary file that then replaces ``path`` (for writers that want a path)."""
    with atomic_file(path) as tmp:
        write(tmp)

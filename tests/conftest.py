"""Test-session setup: 8 fake CPU devices so sharding is exercised for real.

XLA reads XLA_FLAGS once, when jax initialises its backend, so this must run before anything
imports jax. pytest imports conftest.py before any test module, which guarantees that.
"""

import os
import shutil
import tempfile

# XLA's backend (LLVM) optimisation level 0: compilation is most of this suite's time and level 0
# compiles ~20% faster (tests/test_pipeline.py + test_unet_parity.py: 133 -> 106 s); the programs
# compute the same functions (every parity tolerance holds unchanged). A user's default level is
# exercised end to end by the demo's subprocesses (tests/test_demo.py), which run without it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity tests compare fp32 against PyTorch's fp32: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# XLA compilation is most of this suite's time. The two xdist workers, and test files (or
# subprocesses) that build the same program, share compiled executables through JAX's persistent
# cache: its key is the program itself with the compile options, devices and versions, so a hit is
# the executable XLA would have built. The directory is made for this run (the workers inherit it
# from the controlling process, which imports this file first) and removed at its end, so nothing
# carries over between runs. Entries are programs that took >= 1 s to compile (JAX's default).
_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="anim_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR

# grain's multiprocessing workers read absl flags; pytest never runs absl.app, so mark them
# parsed here (google/grain#1355) or every worker dies with UnparsedFlagAccessError.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {len(devs)}: XLA_FLAGS was set too late"
    return devs


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A converted-weights directory of the tiny random model (tests/helpers.py), written once per
    session; its recorded native settings are 32x32, 4 frames, 2 steps."""
    from helpers import write_tiny_weights

    return write_tiny_weights(tmp_path_factory.mktemp("tiny_weights") / "weights",
                              native=dict(width=32, height=32, steps=2, guidance_scale=2.0, context_frames=4))


# Files that take a minute or more of one CI core, roughly longest first (measured with
# ``--durations=0``). They start right after the ``longest`` tests, so the short files are what is
# left to even out the two workers' ends. The two files that export PyTorch models to ONNX come
# early, while their worker is still fresh: late in the suite the same TorchScript export took
# 20-30 s of CPU instead of under 1 s (its Python loops over the graph ran ~40x slower; a cause in
# the worker's state was not found), ~75 s of the suite's CPU time in all.
LONG_FILES = (
    "test_gcs.py", "test_pose_nets_parity.py", "test_dwpose_convert.py", "test_mesh_invariance.py",
    "test_multiprocess_train.py", "test_multiprocess_prepare.py", "test_gcs_multiprocess.py",
    "test_train_animate_anyone.py", "test_fvd.py", "test_driving.py", "test_convert.py", "test_pipeline.py",
    "test_train_animate_anyone_stage2.py", "test_evaluate.py", "test_data_pipeline.py", "test_failure_paths.py",
    "test_gcs_paths.py", "test_bf16.py", "test_unet_parity.py", "test_core.py",
)


def pytest_configure(config):
    # xdist's --dist loadfile hands out files ordered by their number of tests unless told not to,
    # which would start a one-test file of several minutes last; keep the order set below.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


def _schedule_rank(item) -> int:
    if item.get_closest_marker("longest") is not None:
        return 0
    name = item.path.name
    return 1 + LONG_FILES.index(name) if name in LONG_FILES else 1 + len(LONG_FILES)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``longest`` run first, then the files of ``LONG_FILES``: with ``pytest -n 2
    --dist loadfile`` each worker takes the next file when it is free, so a file that takes minutes
    (the demo's two training stages) overlaps the rest of the suite instead of running alone at
    its end."""
    items.sort(key=_schedule_rank)

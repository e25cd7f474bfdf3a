"""The ``anim-jax`` entry point on bad input, run for real in a subprocess: one line on stderr naming
the field or file, the documented exit code, no traceback, and nothing written.

Every case fails before a model is built, so each costs one interpreter start (plus a JAX import
for ``train``).
"""

from __future__ import annotations

import logging
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "stage1.py") + ":tiny"


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anim_jax.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["--config.optimizer.lr=inf"], "optimizer.lr: expected a finite number, got 'inf'"),
        (["--config.optimizer.lrr=1e-3"], "no field 'lrr'"),
        ([], "config.data.dataset is not set"),
        (["--config.data.dataset={tmp}", "--config.trainable.include=('^denoiser\\.','^vae\\.')"],
         "the VAE cannot train here"),
        (["--config.data.dataset={tmp}", "--config.trainable.include=('^denoiser\\.motion',)"],
         "matches no parameter"),
    ],
    ids=["infinite-lr", "misspelled-field", "no-dataset", "trainable-vae", "trainable-matches-nothing"],
)
def test_train_bad_config_fails_before_any_work(tmp_path, overrides, fragment):
    workdir = tmp_path / "run"
    proc = run_cli("train", "--config", TINY, "--workdir", workdir, *(o.format(tmp=tmp_path) for o in overrides),
                   cwd=tmp_path)
    assert_one_line_error(proc, 2, fragment)
    assert not workdir.exists()  # not even WORKDIR/config.json


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "train", "--config", TINY, "--workdir", tmp_path / "run", "--config.optimizer.lr=nan",
                   cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--out", "{tmp}/taken.mp4"], "is a directory"),
        (["--out", "{tmp}/a_file/video.mp4"], "is not a directory"),
        (["--guidance", "nan"], "argument --guidance: must be a finite number >= 0, got 'nan'"),
        (["--guidance", "-1"], "argument --guidance: must be a finite number >= 0, got '-1'"),
        (["--devices", "0"], "argument --devices: must be >= 1, got 0"),
        (["--context-overlap", "24"], "--context-overlap 24 must be less than --context-frames 24"),
        (["--window-batch", "-1"], "argument --window-batch: must be >= 0, got -1"),
    ],
    ids=["out-is-a-directory", "out-under-a-file", "nan-guidance", "negative-guidance", "zero-devices", "overlap",
         "negative-window-batch"],
)
def test_animate_bad_arguments_fail_before_any_work(tmp_path, extra, fragment):
    (tmp_path / "taken.mp4").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "weights").mkdir()
    (tmp_path / "ref.png").write_bytes(b"")
    (tmp_path / "pose.mp4").write_bytes(b"")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = ["--weights", "weights", "--reference", "ref.png", "--pose", "pose.mp4", "--out", "out.mp4"]
    proc = run_cli("animate", *args, *(e.format(tmp=tmp_path) for e in extra), cwd=tmp_path)
    assert_one_line_error(proc, 2, fragment)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("outcome, code", [("completed", 0), ("preempted", 75), ("data_exhausted", 4), ("diverged", 3)])
def test_train_outcomes_have_distinct_exit_codes(monkeypatch, tmp_path, capsys, outcome, code):
    """The status of a run -> the documented exit code (the run itself is replaced: the loop's own
    tests cover SIGTERM and divergence)."""
    from anim_jax import cli
    from anim_jax.train import run as train_run
    from anim_jax.train.loop import LoopResult, NonFiniteLossError

    def fake_train(cfg, workdir):
        if outcome == "diverged":
            raise NonFiniteLossError(4, float("nan"), "loss", 2, discarded_step=3)
        return LoopResult(outcome, 3, None, 3)

    monkeypatch.setattr(train_run, "train", fake_train)
    rc = cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "run"), f"--config.data.dataset={tmp_path}"])
    assert rc == code and cli.EXIT_CODES[code]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if outcome == "preempted":
        assert "rerun the same command to resume" in err
    if outcome == "diverged":
        assert err.strip().count("\n") == 0 and "the last good checkpoint is step 2" in err


def test_a_failing_flop_count_warns_that_mfu_is_lost(caplog):
    from anim_jax.train.run import count_step_flops

    class NoCostModel:  # what step_flops needs of a Trainer
        memo: dict = {}

        def lower(self, model_step=False):
            raise RuntimeError("cost analysis unavailable")

    with caplog.at_level(logging.WARNING, logger="anim_jax.train"):
        assert count_step_flops(NoCostModel(), None) is None
    assert "MFU will not be reported" in caplog.text and "cost analysis unavailable" in caplog.text

"""``anim-jax demo --quick`` end to end: outputs exist and the trained model learned.

The same code path as the full demo (``anim_jax.demo.run``: synthetic data, stage 1 and stage 2
with the real trainer, the real pipeline on held-out characters and poses), with the shortened
settings of ``--quick``; run through the command line in a fresh process with one CPU device, as a
user runs it (the suite's 8 fake devices would shard the tiny model for nothing).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.longest
def test_quick_demo_learns(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "anim_jax.cli", "demo", "--quick", "--out", str(out), "--seed", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out PSNR" in proc.stdout and "the trained model beats both baselines" in proc.stdout

    record = json.loads((out / "metrics.json").read_text())
    n = record["settings"]["heldout_videos"]
    for i in range(n):
        mp4, gif = out / "videos" / f"heldout_{i}.mp4", out / "videos" / f"heldout_{i}.gif"
        assert mp4.stat().st_size > 0
        with Image.open(gif) as im:
            assert im.n_frames == record["settings"]["heldout_frames"]
    table = (out / "metrics.md").read_text()
    assert "| trained model |" in table and "copy the reference frame" in table
    with Image.open(out / "loss.png") as im:
        assert im.size[0] > 100 and np.asarray(im.convert("L")).std() > 0
    for stage in ("stage 1", "stage 2"):
        steps = [s for s, _ in record["losses"][stage]]
        assert steps and steps[-1] == max(steps) and all(np.isfinite(v) for _, v in record["losses"][stage])

    psnr = {k: record["metrics"][k]["mean"]["psnr"] for k in ("trained", "untrained", "copy_reference")}
    # Held-out characters and motions: learning beats both the untrained model and copying the
    # reference frame (which gets the static background exactly right for free).
    assert psnr["trained"] > psnr["untrained"] + 5, psnr
    assert psnr["trained"] > psnr["copy_reference"], psnr
    assert record["trained_beats_baselines"] is True

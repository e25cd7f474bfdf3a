"""Every path a gs:// URL, against a Cloud Storage emulator on localhost (tests/gcs_emulator.py).

One flow, as a user on a pod would run it, with nothing but bucket paths: videos in the bucket ->
``prepare`` into the bucket -> a tiny stage-1 ``train`` with its work directory in the bucket,
stopped by SIGTERM and resumed -> its export -> ``animate`` from the exported weights to an mp4 in
the bucket. Beside it: an interrupted ``prepare`` never reads as complete, and a missing bucket is
one line (exit 2), never a local folder named ``gs:``.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gcs_emulator import BUCKET, gcs  # noqa: E402,F401 - gcs is the module-scoped emulator fixture

from anim_jax import cli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGE1 = str(ROOT / "configs" / "stage1.py") + ":tiny"
B = f"gs://{BUCKET}"
# A stage-1 run on one device with the tiny recipe's batch: the train step is then the program
# tests/test_train_animate_anyone.py compiles, which the suite's compilation cache holds for
# whichever file comes second (compiling it takes ~40 s of a CI core).
TRAIN = ["--config.mesh.num_devices=1", "--config.train.compute_flops=false", "--config.train.log_every=1",
         "--config.train.save_every=100"]


def fs():
    import fsspec

    return fsspec.filesystem("gs")


@pytest.fixture(scope="module")
def videos_in_bucket(gcs, tmp_path_factory):
    """Two synthetic videos with their pose videos, written as ``B/videos`` and ``B/videos_dwpose``."""
    from data_pipelines.synthetic import write_synthetic_videos

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # a URL taken for a local path would appear here
    try:
        write_synthetic_videos(f"{B}/videos", 2, num_frames=8, height=48, width=48)
        assert os.listdir(".") == []
    finally:
        os.chdir(cwd)
    assert len(fs().ls(f"{BUCKET}/videos")) == len(fs().ls(f"{BUCKET}/videos_dwpose")) == 2
    return f"{B}/videos"


@pytest.fixture(scope="module")
def dataset_in_bucket(videos_in_bucket, tmp_path_factory):
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # a URL taken for a local path would appear here
    try:
        assert cli.main(["prepare", videos_in_bucket, "-o", f"{B}/ds", "--workers", "0", "--no-progress"]) == 0
        assert os.listdir(".") == []
    finally:
        os.chdir(cwd)
    return f"{B}/ds"


def test_prepare_writes_a_dataset_that_grain_reads_from_the_bucket(dataset_in_bucket):
    from data_pipelines import dataset

    names = sorted(p.rsplit("/", 1)[1] for p in fs().find(f"{BUCKET}/ds"))
    assert "dataset_info.json" in names and any(".array_record-" in n for n in names), names
    src = dataset.open_dataset(dataset_in_bucket)  # ArrayRecord reads gs:// itself
    assert len(src) == 2
    assert sorted(src[i]["id"] for i in range(2)) == [b"char_00000", b"char_00001"]
    assert int(src[0]["num_frames"]) == 8 and len(src[0]["frames"]) == 8
    assert dataset.read_report(dataset_in_bucket)["num_videos"] == 2


@pytest.fixture
def kill_uploads_after_one(monkeypatch):
    """``arm()`` makes ``storage.upload_file`` upload one object, then die as a killed process
    would; it returns the list of uploaded URLs (clear it to allow one more)."""
    from anim_jax import storage

    real, uploaded = storage.upload_file, []

    def dies_after_one(local, url):
        if uploaded:
            raise KeyboardInterrupt("killed")
        uploaded.append(str(url))
        real(local, url)

    def arm():
        monkeypatch.setattr(storage, "upload_file", dies_after_one)
        return uploaded

    return arm


def test_an_interrupted_prepare_never_reads_as_complete(videos_in_bucket, dataset_in_bucket, kill_uploads_after_one,
                                                         monkeypatch):
    """The upload stops after its first object (as a killed process would): the new dataset is not
    complete; replacing a complete one takes its commit marker away first."""
    from data_pipelines import dataset

    uploaded = kill_uploads_after_one()
    for out, extra in ((f"{B}/ds_new", []), (dataset_in_bucket + "_copy", ["--overwrite"])):
        if extra:  # a complete dataset to replace
            fs().copy(f"{BUCKET}/ds", f"{BUCKET}/ds_copy", recursive=True)
            assert dataset.is_complete(out)
        uploaded.clear()
        with pytest.raises(KeyboardInterrupt):
            cli.main(["prepare", videos_in_bucket, "-o", out, "--workers", "0", "--no-progress", *extra])
        assert len(uploaded) == 1 and not uploaded[0].endswith("dataset_info.json")
        assert fs().exists(uploaded[0].removeprefix("gs://"))  # part of it is there ...
        assert not dataset.is_complete(out)  # ... but it does not read as a dataset
        with pytest.raises(FileNotFoundError, match="no complete anim_jax dataset"):
            dataset.open_dataset(out)
    monkeypatch.undo()
    assert dataset.is_complete(dataset_in_bucket)  # the other dataset untouched


def test_an_interrupted_export_never_reads_as_complete(gcs, kill_uploads_after_one, monkeypatch):
    """Weights directories in the bucket: complete once written; a rewrite cut short after one object
    leaves a directory without its commit marker (anim_jax.json), which readers refuse."""
    from flax import nnx

    from anim_jax import weights_dir
    from anim_jax.convert.components import load_components, save_components
    from anim_jax.diffusion import moore_inference_schedule
    from anim_jax.models.pose_guider import PoseGuider

    out = f"{B}/weights/tiny"
    components = {"pose_guider": PoseGuider(16, (4, 8), rngs=nnx.Rngs(0))}  # one small component suffices
    save_components(out, components, schedule=moore_inference_schedule())
    loaded = load_components(out, components=("pose_guider",))
    want = components["pose_guider"].conv_in.kernel[...]
    np.testing.assert_array_equal(np.asarray(loaded["pose_guider"].conv_in.kernel[...]), np.asarray(want))

    uploaded = kill_uploads_after_one()
    with pytest.raises(KeyboardInterrupt):
        save_components(out, components, schedule=moore_inference_schedule())
    monkeypatch.undo()
    assert uploaded and uploaded[0].endswith(".safetensors")
    with pytest.raises(FileNotFoundError, match="anim_jax.json is missing"):
        weights_dir.read_config(out)


def test_a_missing_bucket_is_one_line_and_writes_nothing_locally(gcs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, code in ((["prepare", "videos", "-o", "gs://no-such-bucket/ds"], cli.EXIT_USAGE),
                       (["animate", "--weights", "w", "--reference", "r.png", "--out", "gs://no-such-bucket/o.mp4"],
                        cli.EXIT_USAGE)):
        assert cli.main(argv) == code
        err = capsys.readouterr().err
        assert "no-such-bucket" in err and "does not exist" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def _stop_at(step):
    """train_loop with a SIGTERM sent to this process once ``step`` is done (a real signal, handled
    by the loop as a preemption: save, then stop)."""
    from anim_jax.train import run

    real = run.train_loop

    def loop(*args, hooks=(), **kwargs):
        def kill(s, state, metrics):
            if s == step:
                os.kill(os.getpid(), signal.SIGTERM)

        return real(*args, hooks=[*hooks, kill], **kwargs)

    return loop


def test_train_in_the_bucket_survives_sigterm_resumes_exports_and_animates(dataset_in_bucket, monkeypatch, tmp_path):
    from anim_jax import weights_dir
    from anim_jax.checkpoint import CheckpointManager
    from anim_jax.train import metrics as metrics_lib
    from anim_jax.train import run

    workdir = f"{B}/runs/s1"
    argv = ["train", "--config", STAGE1, "--workdir", workdir, f"--config.data.dataset={dataset_in_bucket}", *TRAIN]
    monkeypatch.setattr(run, "train_loop", _stop_at(1))
    assert cli.main([*argv, "--config.train.num_steps=3"]) == cli.EXIT_PREEMPTED
    monkeypatch.undo()
    with CheckpointManager(workdir + "/checkpoints") as cm:
        assert cm.all_steps() == [1]  # committed (Orbax's commit_success.txt) in the bucket
    assert not fs().exists(f"{BUCKET}/runs/s1/export")
    assert cli.main([*argv, "--config.train.num_steps=2"]) == cli.EXIT_OK  # resumes from step 1
    with CheckpointManager(workdir + "/checkpoints") as cm:
        assert cm.all_steps() == [1, 2]
    steps = [r["step"] for r in metrics_lib.read_metrics(workdir + "/logs") if "loss" in r]
    assert steps == [1, 2]  # the resumed run appended to the first run's metrics.jsonl
    assert len(fs().glob(f"{BUCKET}/runs/s1/logs/events.out.tfevents.*")) == 2
    assert json.loads(fs().cat(f"{BUCKET}/runs/s1/config.json"))["stage"] == 1
    export = workdir + "/export"
    assert weights_dir.read_config(export)["step"] == 2

    # animate: weights, reference image and pose video in the bucket, the mp4 written there.
    from PIL import Image

    from data_pipelines import dataset
    from data_pipelines.video_io import decode_image

    record = dataset.open_dataset(dataset_in_bucket)[0]
    Image.fromarray(np.asarray(decode_image(record["frames"][0]))).save(tmp_path / "ref.png")
    fs().put_file(str(tmp_path / "ref.png"), f"{BUCKET}/inputs/ref.png")
    out = f"{B}/out/anim.mp4"
    assert cli.main(["animate", "--weights", export, "--reference", f"{B}/inputs/ref.png",
                     "--pose", f"{B}/videos_dwpose/char_00000.mp4", "--out", out, "--width", "32", "--height", "32",
                     "--frames", "2", "--steps", "1", "--no-progress"]) == 0
    fs().get_file(out.removeprefix("gs://"), str(tmp_path / "anim.mp4"))
    from anim_jax import media

    frames, _ = media.read_video_frames(tmp_path / "anim.mp4")
    assert len(frames) == 2 and frames[0].size == (32, 32)

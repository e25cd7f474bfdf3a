"""The inputs that take gs:// besides those of tests/test_gcs.py's end-to-end flow, each against the
Cloud Storage emulator (tests/gcs_emulator.py): ``convert``'s PyTorch / safetensors checkpoints,
``animate --driving-video``, ``--config`` files, ``serve --weights``, a ``prepare`` meta JSON listing
bucket videos and ``prepare --extract-poses`` into the bucket. Each also checks that a missing
object is one line naming the flag (exit 2), before any work.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pose_helpers as ph  # noqa: E402
from gcs_emulator import BUCKET, gcs  # noqa: E402,F401 - gcs is the module-scoped emulator fixture
from helpers import write_tiny_weights  # noqa: E402

from anim_jax import cli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
B = f"gs://{BUCKET}"
# Small detection sizes keep the tiny DWPose networks fast (as tests/test_pose_extract.py).
POSE_CLI = ["--detect-resolution", "64", "--detector-size", "128"]


def fs():
    import fsspec

    return fsspec.filesystem("gs")


def upload(local, url: str) -> str:
    """``local`` (a file or a folder) copied to ``url``; returns ``url``."""
    from anim_jax import storage

    local = pathlib.Path(local)
    if local.is_dir():
        storage.upload_tree(local, url, last=())
    else:
        storage.upload_file(local, url)
    return url


def assert_one_line(capsys, *fragments) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(f in err for f in fragments), err


@pytest.fixture(scope="module")
def tiny_weights_in_bucket(gcs, tmp_path_factory):
    """The tiny Animate Anyone weights (tests/helpers.py) at 32x32, 4 frames, 2 steps, in the bucket."""
    local = write_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny",
                               native=dict(width=32, height=32, steps=1, guidance_scale=2.0, context_frames=4))
    return upload(local, f"{B}/weights/tiny")


@pytest.fixture(scope="module")
def dwpose_in_bucket(gcs, tmp_path_factory):
    """Tiny random DWPose networks (every keypoint confident, so alignment finds a neck), in the bucket."""
    local = ph.tiny_dwpose(tmp_path_factory.mktemp("dwpose") / "tiny", confident_keypoints=True)
    return upload(local, f"{B}/weights/dwpose")


# ------------------------------------------------------------------------------------------------
# 1. convert: PyTorch and safetensors inputs in the bucket


def _pose_guider_pth(path: pathlib.Path) -> None:
    """Moore's pose_guider.pth for a tiny PoseGuider (random values), as torch.save writes it."""
    from flax import nnx

    from anim_jax.convert.loader import expected_torch_shapes
    from anim_jax.convert.pose_guider_keys import POSE_GUIDER_KEYMAP
    from anim_jax.convert.torch_writer import save_torch_state_dict
    from anim_jax.models.pose_guider import PoseGuider

    shapes = expected_torch_shapes(PoseGuider(16, (4, 8), rngs=nnx.Rngs(0)), POSE_GUIDER_KEYMAP)
    rng = np.random.default_rng(0)
    save_torch_state_dict(path, {k: rng.normal(size=s).astype(np.float32) for k, (_, s) in sorted(shapes.items())})


def _vae_folder(folder: pathlib.Path) -> None:
    """A diffusers AutoencoderKL folder (config.json + safetensors) of a tiny VAE (random values)."""
    import safetensors.numpy
    from flax import nnx

    from anim_jax.convert.loader import expected_torch_shapes
    from anim_jax.convert.vae_keys import VAE_KEYMAP
    from anim_jax.models.vae import AutoencoderKL, VAEConfig

    config = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4)
    model = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file({k: rng.normal(size=s).astype(np.float32)
                                 for k, (_, s) in expected_torch_shapes(model, VAE_KEYMAP).items()},
                                str(folder / "diffusion_pytorch_model.safetensors"))


def test_convert_reads_pytorch_and_safetensors_checkpoints_from_the_bucket(gcs, tmp_path, capsys):
    """``--moore`` (a .pth) and ``--vae`` (a safetensors folder) in the bucket convert to the same
    weights as the same files on disk; the record names the URLs, not the temporary downloads."""
    from anim_jax.convert.readers import read_safetensors

    (tmp_path / "moore").mkdir()
    _pose_guider_pth(tmp_path / "moore" / "pose_guider.pth")
    _vae_folder(tmp_path / "vae")
    upload(tmp_path / "moore", f"{B}/convert/moore")
    upload(tmp_path / "vae", f"{B}/convert/vae")
    local_out, out = tmp_path / "local", f"{B}/convert/out"
    for moore, vae, dest in ((tmp_path / "moore", tmp_path / "vae", local_out),
                             (f"{B}/convert/moore", f"{B}/convert/vae", out)):
        assert cli.main(["convert", "--moore", str(moore), "--vae", str(vae), "--out", str(dest), "--no-progress"]) == 0
    fs().get(f"{BUCKET}/convert/out/", str(tmp_path / "from_bucket"), recursive=True)
    for name in ("pose_guider", "vae"):
        want = read_safetensors(local_out / f"{name}.safetensors")
        got = read_safetensors(tmp_path / "from_bucket" / f"{name}.safetensors")
        assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    sources = json.loads((tmp_path / "from_bucket" / "anim_jax.json").read_text())["conversion"]["sources"]
    assert sources == {"pose_guider": [f"{B}/convert/moore/pose_guider.pth"],
                       "vae": [f"{B}/convert/vae/diffusion_pytorch_model.safetensors"]}, sources
    capsys.readouterr()

    # A missing object or bucket: one line naming the flag, before anything is downloaded or written.
    out2 = ["--out", f"{B}/convert/out2", "--no-progress"]
    for argv, flag in ((["convert", "--moore", f"{B}/convert/nothing", *out2], "--moore"),
                       (["convert", "--pose-guider", f"{B}/convert/nothing.pth", *out2], "--pose-guider"),
                       (["convert", "--vae", "gs://no-such-bucket/vae", *out2], "--vae"),
                       (["convert", "--moore", str(tmp_path / "moore"), "--out", "gs://no-such-bucket/w"], "--out"),
                       (["export", "--weights", out, "--out", "gs://no-such-bucket/moore"], "--out"),
                       (["export", "--weights", f"{B}/convert/nothing", "--out", str(tmp_path / "e")], "--weights")):
        assert cli.main(argv) == cli.EXIT_USAGE
        assert_one_line(capsys, flag)
    assert not fs().exists(f"{BUCKET}/convert/out2") and not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------------------
# 2. animate --driving-video (and --pose-weights) in the bucket


def test_animate_from_a_driving_video_in_the_bucket(tiny_weights_in_bucket, dwpose_in_bucket, tmp_path, capsys):
    from PIL import Image

    from anim_jax import media

    media.write_mp4(tmp_path / "dance.mp4", np.stack([ph.synthetic_frame(72, 96, f"dance{i}") for i in range(2)]), fps=10)
    Image.fromarray(ph.synthetic_frame(80, 60, "reference")).save(tmp_path / "ref.png")
    video = upload(tmp_path / "dance.mp4", f"{B}/driving/dance.mp4")
    out = f"{B}/driving/out/result.mp4"
    argv = ["animate", "--weights", tiny_weights_in_bucket, "--reference", str(tmp_path / "ref.png"),
            "--pose-weights", dwpose_in_bucket, "--out", out, "--devices", "1", "--no-progress", *POSE_CLI]
    assert cli.main([*argv, "--driving-video", video, "--save-poses", "--grid"]) == 0, capsys.readouterr().err
    names = sorted(p.rsplit("/", 1)[1] for p in fs().ls(f"{BUCKET}/driving/out"))
    assert names == ["result.mp4", "result_driving_keypoints.npz", "result_grid.mp4", "result_keypoints.npz",
                     "result_pose.mp4"]
    fs().get_file(out.removeprefix("gs://"), str(tmp_path / "result.mp4"))
    assert len(media.read_video_frames(tmp_path / "result.mp4")[0]) == 2
    capsys.readouterr()
    for flag, value in (("--driving-video", f"{B}/driving/missing.mp4"), ("--pose-weights", f"{B}/weights/none")):
        bad = [*argv, "--driving-video", video]
        bad[bad.index(flag) + 1] = value
        assert cli.main(bad) == cli.EXIT_USAGE
        assert_one_line(capsys, flag, "does not exist" if flag == "--driving-video" else "not a directory")


# ------------------------------------------------------------------------------------------------
# 3. --config files in the bucket (with the path:arg suffix)


def test_config_file_in_the_bucket(gcs, tmp_path, monkeypatch, capsys):
    from anim_jax import configlib

    url = upload(ROOT / "configs" / "stage1.py", f"{B}/configs/stage1.py")
    assert configlib.split_spec(f"{url}:tiny") == (url, "tiny")
    got = configlib.load_config(f"{url}:tiny", ["--config.optimizer.lr=0.5"])
    want = configlib.load_config(str(ROOT / "configs" / "stage1.py") + ":tiny", ["--config.optimizer.lr=0.5"])
    assert got.to_dict() == want.to_dict() and got.optimizer.lr == 0.5
    assert configlib.load_config(url).to_dict() == configlib.load_config(str(ROOT / "configs" / "stage1.py")).to_dict()

    monkeypatch.chdir(tmp_path)
    for spec, fragment in ((f"{B}/configs/missing.py:tiny", "does not exist"), ("gs://no-such-bucket/c.py", "no-such-bucket")):
        assert cli.main(["train", "--config", spec, "--workdir", f"{B}/runs/never"]) == cli.EXIT_USAGE
        assert_one_line(capsys, spec.split(":tiny")[0], fragment)
    assert list(tmp_path.iterdir()) == [] and not fs().exists(f"{BUCKET}/runs/never")


# ------------------------------------------------------------------------------------------------
# 4. serve --weights / --pose-weights in the bucket


def test_serve_loads_weights_from_the_bucket(tiny_weights_in_bucket, dwpose_in_bucket, monkeypatch, capsys):
    import signal

    from anim_jax import serve

    served = []
    monkeypatch.setattr(serve, "launch", lambda animator, **kw: served.append(animator))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # run_serve's SIGTERM handler: not in pytest's process
    assert cli.main(["serve", "--weights", tiny_weights_in_bucket, "--pose-weights", dwpose_in_bucket]) == 0
    (animator,) = served
    assert (animator.settings.width, animator.settings.frames) == (32, 4)  # read from the bucket's anim_jax.json
    assert animator.extractor is not None
    assert not animator.workdir.exists()  # the local upload folder is removed on the way out
    capsys.readouterr()
    for argv, fragment in ((["--weights", f"{B}/weights/none"], "anim_jax.json is missing"),
                           (["--weights", "gs://no-such-bucket/w"], "does not exist"),
                           (["--weights", tiny_weights_in_bucket, "--pose-weights", f"{B}/weights/none"], "--pose-weights")):
        assert cli.main(["serve", *argv]) == cli.EXIT_USAGE
        assert_one_line(capsys, fragment)


# ------------------------------------------------------------------------------------------------
# 5. prepare from a meta JSON whose entries are in the bucket


@pytest.fixture(scope="module")
def videos_in_bucket(gcs):
    from data_pipelines.synthetic import write_synthetic_videos

    write_synthetic_videos(f"{B}/meta/videos", 2, num_frames=4, height=32, width=32)
    return f"{B}/meta/videos"


def test_prepare_from_a_meta_json_listing_bucket_videos(videos_in_bucket, tmp_path, monkeypatch):
    """A meta JSON in the bucket with paths relative to it, and a local one with gs:// URLs: each
    video is downloaded while it is processed; ids and the report are those of the bucket paths."""
    from data_pipelines import dataset

    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would appear here
    relative = [{"video_path": f"videos/char_{i:05d}.mp4", "kps_path": f"videos_dwpose/char_{i:05d}.mp4"}
                for i in range(2)]
    relative.append({"video_path": "videos/gone.mp4", "kps_path": "videos_dwpose/gone.mp4"})
    fs().pipe(f"{BUCKET}/meta/meta.json", json.dumps(relative).encode())
    absolute = [{k: f"{B}/meta/{v}" for k, v in it.items()} for it in relative[:2]]
    (tmp_path / "meta.json").write_text(json.dumps(absolute))
    for meta, out in ((f"{B}/meta/meta.json", f"{B}/meta/ds"), (str(tmp_path / "meta.json"), f"{B}/meta/ds_local_meta")):
        assert cli.main(["prepare", meta, "-o", out, "--workers", "0", "--no-progress"]) == 0
        src = dataset.open_dataset(out)
        assert sorted(src[i]["id"] for i in range(len(src))) == [b"char_00000", b"char_00001"]
        assert int(src[0]["num_frames"]) == 4
    report = dataset.read_report(f"{B}/meta/ds")
    assert [(s["id"], s["video_path"], s["reason"]) for s in report["skipped"]] == [
        ("gone", f"{B}/meta/videos/gone.mp4", "missing video")]
    assert sorted(os.listdir(tmp_path)) == ["meta.json"]
    assert cli.main(["prepare", f"{B}/meta/none.json", "-o", f"{B}/meta/ds2", "--no-progress"]) == cli.EXIT_USAGE


# ------------------------------------------------------------------------------------------------
# 6. prepare --extract-poses into the bucket


def test_prepare_extract_poses_into_the_bucket(videos_in_bucket, dwpose_in_bucket, tmp_path, monkeypatch):
    """Raw videos and DWPose weights in the bucket, the dataset written there: the keypoint files
    wait in OUTPUT.poses/ in the bucket (so an interrupted run resumes without re-extracting) and are
    removed once the dataset, with dataset_info.json last, is complete."""
    from anim_jax.pose.extract import PoseExtractor
    from data_pipelines import dataset
    from data_pipelines import prepare as prep

    monkeypatch.chdir(tmp_path)
    out = f"{B}/poses/ds"
    argv = ["prepare", videos_in_bucket, "-o", out, "--extract-poses", "--pose-weights", dwpose_in_bucket, *POSE_CLI,
            "--pose-batch-size", "4", "--workers", "0", "--no-progress"]

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "process_video", boom)  # interrupted while writing the records
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    monkeypatch.undo()
    assert not dataset.is_complete(out)
    assert sorted(p.rsplit("/", 1)[1] for p in fs().find(f"{BUCKET}/poses/ds.poses")) == ["char_00000.npz", "char_00001.npz"]

    def no_extractor(*a, **k):
        raise AssertionError("poses were extracted again")

    monkeypatch.setattr(PoseExtractor, "from_pretrained", no_extractor)
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 0
    monkeypatch.undo()
    assert dataset.is_complete(out) and not fs().exists(f"{BUCKET}/poses/ds.poses")
    src = dataset.open_dataset(out)
    assert len(src) == 2 and len(src[0]["keypoints"]) > 0 and int(src[0]["num_frames"]) == 4
    assert list(tmp_path.iterdir()) == []
    bad = ["prepare", videos_in_bucket, "-o", f"{B}/poses/ds2", "--extract-poses", "--pose-weights", f"{B}/weights/none"]
    assert cli.main(bad) == cli.EXIT_USAGE


# ------------------------------------------------------------------------------------------------
# anim-jax pose and convert-pose: videos, networks and outputs in the bucket


def test_pose_command_on_a_bucket_folder(videos_in_bucket, dwpose_in_bucket, tmp_path, monkeypatch, capsys):
    """A folder of videos in the bucket -> pose videos and keypoints in the bucket at the same
    relative paths; a rerun skips what is there."""
    from anim_jax.pose.extract import Poses

    monkeypatch.chdir(tmp_path)
    argv = ["pose", videos_in_bucket, "--weights", dwpose_in_bucket, "--out", f"{B}/posecli/out",
            "--keypoints", f"{B}/posecli/kps", *POSE_CLI, "--batch-size", "4", "--no-progress"]
    assert cli.main(argv) == 0
    assert sorted(fs().ls(f"{BUCKET}/posecli/out")) == [f"{BUCKET}/posecli/out/char_{i:05d}.mp4" for i in range(2)]
    fs().get_file(f"{BUCKET}/posecli/kps/char_00001.npz", str(tmp_path / "k.npz"))
    assert len(Poses.load(tmp_path / "k.npz")) == 4
    (tmp_path / "k.npz").unlink()
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "all 2 videos already have pose videos" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_onnx_networks_are_read_from_the_bucket(gcs, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from anim_jax.convert.onnx_graph import load_onnx

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "tiny.onnx"))
    url = upload(tmp_path / "tiny.onnx", f"{B}/onnx/tiny.onnx")
    loaded = load_onnx(url, "detector ONNX file")
    assert [op.kind for op in loaded.ops] == ["conv"] and url in loaded.source
    with pytest.raises(FileNotFoundError, match="detector ONNX file 'gs://.*/onnx/none.onnx' does not exist"):
        load_onnx(f"{B}/onnx/none.onnx", "detector ONNX file")


def test_demo_writes_its_folder_into_the_bucket(gcs, tmp_path, monkeypatch, capsys):
    """``anim-jax demo --out gs://...``: the run (stubbed here: the real one is tests/test_demo.py)
    writes into a local temporary folder, which lands in the bucket with the paths in its text files
    and in the printed summary rewritten to the bucket's; nothing stays local. A missing bucket is one
    line before any work."""
    from anim_jax import demo

    def fake_run(out, settings, **kwargs):
        (out / "videos").mkdir(parents=True)
        (out / "videos" / "heldout_0.gif").write_bytes(b"GIF89a")
        (out / "metrics.md").write_text(f"weights: {out}/weights\n")
        (out / "metrics.json").write_text(json.dumps({"inputs": f"{out}/inputs/reference_0.png"}))
        return {"out": str(out)}

    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr(demo, "summary", lambda result: f"metrics: {result['out']}/metrics.md")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--out", f"{B}/demo"]) == 0
    assert capsys.readouterr().out.strip() == f"metrics: {B}/demo/metrics.md"
    assert sorted(fs().find(f"{BUCKET}/demo")) == [f"{BUCKET}/demo/{n}" for n in
                                                    ("metrics.json", "metrics.md", "videos/heldout_0.gif")]
    assert fs().cat(f"{BUCKET}/demo/metrics.md").decode() == f"weights: {B}/demo/weights\n"
    assert json.loads(fs().cat(f"{BUCKET}/demo/metrics.json")) == {"inputs": f"{B}/demo/inputs/reference_0.png"}
    assert list(tmp_path.iterdir()) == []

    assert cli.main(["demo", "--out", "gs://no-such-bucket/demo"]) == cli.EXIT_USAGE
    assert_one_line(capsys, "--out", "does not exist")

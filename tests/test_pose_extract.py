"""The extractor on the device mesh and ``anim-jax pose``, with tiny random DWPose networks.

Random weights make meaningless keypoints; what is tested is the plumbing: sharding, fixed-shape
batches, the video and folder paths, the files written and the errors. Exactness of the processing
itself against Moore's code is ``test_pose_preprocess.py``.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pose_helpers as ph  # noqa: E402
from anim_jax.parallel import make_mesh  # noqa: E402
from anim_jax.pose.extract import PoseExtractor, PoseInputError, Poses, _compiled  # noqa: E402


# Small detection sizes keep the tiny networks fast on CPU (DWPose's own are 512 and 640).
SMALL = dict(batch_size=8, detect_resolution=64, detector_input=(128, 128))
CLI_SMALL = ("--detect-resolution", 64, "--detector-size", 128, "--no-progress")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny DWPose networks whose detector is confident at the stride-32 anchors, so every frame has
    several persons and the pose network runs."""
    return ph.tiny_dwpose(tmp_path_factory.mktemp("dwpose") / "tiny")


@pytest.fixture(scope="module")
def frames():
    return np.stack([ph.synthetic_frame(72, 96, f"extract{i}") for i in range(11)])


def test_sharded_extraction_equals_single_device(weights, frames, devices):
    sharded = PoseExtractor.from_pretrained(weights, all_persons=True, **SMALL)
    assert sharded.networks.mesh.size == 8
    single = PoseExtractor.from_pretrained(weights, all_persons=True, mesh=make_mesh((1,), ("data",), devices[:1]), **SMALL)
    detect, estimate = _compiled()
    before = detect._cache_size(), estimate._cache_size()
    a = sharded(frames)
    # 11 frames = one full batch and one padded one: each network compiled (at most) once.
    assert detect._cache_size() - before[0] <= 1 and estimate._cache_size() - before[1] <= 1
    b = single(frames)
    assert a.num_persons.min() >= 2  # the confident detector finds several people in every frame
    np.testing.assert_array_equal(a.num_persons, b.num_persons)
    # XLA's CPU convolutions round differently at 1 and 8 images per device, so boxes (hence keypoints,
    # measured in ~100 px frames) and scores agree to float32 rounding, not bit for bit.
    np.testing.assert_allclose(a.keypoints, b.keypoints, rtol=0, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    # Moore's single-person rule picks one of the persons found.
    best = PoseExtractor.from_pretrained(weights, **SMALL)(frames[:3])
    assert best.num_persons.tolist() == [1, 1, 1]
    for f in range(3):
        assert any(np.array_equal(best.keypoints[f, 0], a.keypoints[f, p]) for p in range(a.num_persons[f]))
    assert best.image_size == (72, 96) and best.detect_size == (64, 64)
    assert best.keypoints.shape == (3, 1, 133, 2) and best.openpose_body()[0].shape == (3, 1, 18, 2)


def test_poses_save_load_and_render_sizes(weights, frames, tmp_path):
    poses = PoseExtractor.from_pretrained(weights, **SMALL)(frames[:2])
    path = tmp_path / "kp.npz"
    poses.save(path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    back = Poses.load(path)
    np.testing.assert_array_equal(back.keypoints, poses.keypoints)
    np.testing.assert_array_equal(back.scores, poses.scores)
    assert back.detect_size == poses.detect_size and back.image_size == poses.image_size
    back.scores[:] = 1.0  # the random network's scores are low; make every point drawable
    a = list(back.render("detect"))
    assert a[0].shape == (64, 64, 3) and a[0].any()
    assert next(back.render("source")).shape == (72, 96, 3)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PoseInputError, match="junk.npz"):
        Poses.load(tmp_path / "junk.npz")


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def _write_synthetic(root, n, frames=6):
    from data_pipelines.synthetic import write_synthetic_videos

    root.mkdir(parents=True)
    made = write_synthetic_videos(root.parent / "made", n, num_frames=frames, height=72, width=96, fps=12.0, lossless=False)
    return [os.replace(v, root / os.path.basename(v)) or root / os.path.basename(v) for v, _ in made]


class _Run:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def cli(capsys):
    """``anim-jax pose ...`` in this process (compiled networks are reused between calls)."""
    from anim_jax.cli import main

    def run(*args):
        capsys.readouterr()
        code = main(["pose", *map(str, args)])
        out, err = capsys.readouterr()
        return _Run(code, out, err)

    return run


def test_pose_cli_video_and_folder(weights, tmp_path, cli, monkeypatch):
    from data_pipelines.video_io import read_video

    from anim_jax.pose import compile_options

    winograd_args, prepare = [], compile_options.prepare

    def recording_prepare(model, platform, *, winograd=None):
        winograd_args.append(winograd)
        return prepare(model, platform, winograd=winograd)

    monkeypatch.setattr(compile_options, "prepare", recording_prepare)

    video, video2 = _write_synthetic(tmp_path / "clips", 2)
    os.makedirs(tmp_path / "clips" / "sub")
    os.replace(video2, tmp_path / "clips" / "sub" / "b.mp4")
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00" * 100)
    out, kp = tmp_path / "poses.mp4", tmp_path / "kp.npz"
    r = cli(video, "--weights", weights, "--out", out, "--keypoints", kp, *CLI_SMALL)
    assert r.returncode == 0, r.stderr
    assert "6 frames" in r.stdout
    frames, fps = read_video(out)
    assert frames.shape == (6, 64, 64, 3) and fps == pytest.approx(12.0)
    assert len(Poses.load(kp)) == 6
    # exists -> refused before any work; --source-size keeps the video's size
    r = cli(video, "--weights", weights, "--out", out, "--no-progress")
    assert r.returncode == 2 and "exists" in r.stderr
    r = cli(video, "--weights", weights, "--out", out, "--source-size", "--overwrite", "--direct-conv", *CLI_SMALL)
    assert r.returncode == 0, r.stderr
    assert read_video(out)[0].shape == (6, 72, 96, 3)
    assert winograd_args == [None, False]  # the detector: Winograd by platform, then --direct-conv

    # A folder: Moore's layout, one pass, the broken file reported, the rest written.
    r = cli(tmp_path / "clips", "--weights", weights, "--keypoints", tmp_path / "kps", *CLI_SMALL)
    assert r.returncode == 1 and "broken.mp4" in r.stderr
    root = tmp_path / "clips_dwpose"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.mp4")) == ["char_00000.mp4", "sub/b.mp4"]
    assert len(Poses.load(tmp_path / "kps" / "sub" / "b.npz")) == 6
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]  # no temporary files left
    assert read_video(root / "sub" / "b.mp4")[0].shape == (6, 64, 64, 3)
    # rerun: finished videos are not redone
    mtime = (root / "sub" / "b.mp4").stat().st_mtime_ns
    cli(tmp_path / "clips", "--weights", weights, "--keypoints", tmp_path / "kps", *CLI_SMALL)
    assert (root / "sub" / "b.mp4").stat().st_mtime_ns == mtime


def test_pose_cli_reports_frames_without_person():
    from anim_jax.pose.cli import _summary

    poses = Poses(np.zeros((3, 1, 133, 2)), np.zeros((3, 1, 133), np.float32), np.array([1, 0, 0]), (8, 8), (64, 64))
    assert _summary("out.mp4", poses) == "out.mp4: 3 frames, 2 without a person (frames 1, 2)"


def test_pose_cli_bad_inputs(weights, tmp_path, cli):
    def usage_error(r):  # the form every anim-jax command gives a usage error: one line, exit code 2
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("anim-jax pose: error: "), r.stderr
        return lines[0]

    r = cli(tmp_path / "nope.mp4", "--weights", weights)
    assert "nope.mp4" in usage_error(r) and "does not exist" in r.stderr
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 10)
    r = cli(bad, "--weights", weights, *CLI_SMALL)
    assert "bad.mp4" in usage_error(r) and "not a readable video" in r.stderr
    assert not (tmp_path / "bad_kps.mp4").exists()
    r = cli(bad, "--weights", tmp_path / "missing")
    assert r.returncode == 2 and "--weights" in r.stderr
    r = cli(bad, "--weights", weights, "--out", tmp_path / "x.txt")
    assert r.returncode == 2 and "x.txt" in r.stderr


def test_prepare_extract_poses(weights, tmp_path, monkeypatch):
    """``anim-jax prepare --extract-poses``: keypoints stored with the records, pose frames equal to
    rendering them, the stage-1/2 pipelines read it, an interrupted run resumes without re-extracting."""
    import io

    from data_pipelines import dataset as dataset_lib
    from data_pipelines import grain_pipeline as G
    from data_pipelines import prepare as prep
    from data_pipelines.video_io import decode_image

    _write_synthetic(tmp_path / "clips", 2, frames=8)
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00" * 100)
    out = str(tmp_path / "ds")
    options = dict(extract_poses=True, pose_weights=weights, pose_batch_size=8, workers=0, progress=False, verbose=False,
                   pose_options=dict(detect_resolution=64, detector_input=(128, 128)))  # fmt: skip

    # Interrupted while writing the records: nothing reads as complete, the keypoints are kept.
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "process_video", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(tmp_path / "clips"), out, **options)
    monkeypatch.undo()
    assert not dataset_lib.is_complete(out)
    cached = sorted(p.name for p in (tmp_path / "ds.poses").iterdir())
    assert cached == ["broken.error", "char_00000.npz", "char_00001.npz"]

    # The rerun resumes: no extraction (the extractor is never built), the dataset is written.
    def no_extractor(*a, **k):
        raise AssertionError("poses were extracted again")

    monkeypatch.setattr(PoseExtractor, "from_pretrained", no_extractor)
    prep.prepare(str(tmp_path / "clips"), out, **options)
    monkeypatch.undo()
    assert dataset_lib.is_complete(out) and not (tmp_path / "ds.poses").exists()
    report = dataset_lib.read_report(out)
    assert report["num_videos"] == 2 and [s["id"] for s in report["skipped"]] == ["broken"]
    # The rerun extracted nothing; its time went into the records (read by benchmarks/prepare.py).
    assert report["poses_extracted"] == 0
    assert set(report["stage_s"]) == {"decode", "encode_frames", "render", "encode_poses"} and min(report["stage_s"].values()) > 0

    src = dataset_lib.open_dataset(out)
    for i in range(len(src)):
        record = src[i]
        poses = Poses.load(io.BytesIO(record["keypoints"]))
        assert len(poses) == int(record["num_frames"]) == 8
        assert (int(record["pose_height"]), int(record["pose_width"])) == poses.detect_size == (64, 64)
        for f, picture in enumerate(poses.render("detect")):
            np.testing.assert_array_equal(decode_image(record["poses"][f]), picture)
    for stage in (1, 2):
        cfg = G.DataConfig(path=out, stage=stage, resolution=32, n_frames=4, sample_rate=1, sample_margin=2,
                           clip_size=16, batch_size=2, seed=0)  # fmt: skip
        batch = G.make_map_dataset(cfg, process_index=0, process_count=1)[0]
        assert batch["pose" if stage == 1 else "poses"].shape[-3:] == (32, 32, 3)



@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--pose-weights", "w", "--detector-size", "100"], "--detector-size must be a positive multiple of 32, got 100"),
        (["--pose-weights", "w", "--detect-resolution", "32"], "--detect-resolution must be 0 or >= 64, got 32"),
        ([], "--extract-poses needs --pose-weights"),
    ],
    ids=["detector-size", "detect-resolution", "no-weights"],
)
def test_prepare_cli_bad_pose_options(tmp_path, capsys, flags, fragment):
    from anim_jax.cli import main

    (tmp_path / "clips").mkdir()
    code = main(["prepare", str(tmp_path / "clips"), "-o", str(tmp_path / "ds"), "--extract-poses", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("anim-jax prepare: error: "), err
    assert fragment in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips"]

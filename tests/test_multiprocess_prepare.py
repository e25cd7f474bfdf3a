"""``anim-jax prepare --extract-poses`` in a real two-process run on localhost (jax.distributed, 2
processes x 4 CPU devices), against the same preparation in one process.

The test runs this file twice as a worker (``python test_multiprocess_prepare.py ARGS...``): the real
``anim-jax prepare`` entry point, with ``PoseExtractor.extract_videos`` wrapped to print which videos
this process extracted. Random tiny networks: what is tested is the sharing-out of the videos and
the one dataset written, not what the keypoints mean.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 120
MARK = "extracted by process "
# Small detection sizes keep the tiny networks fast; 4 frames per device batch = 1 per device on the
# 4 devices of every process and of the reference mesh, so the networks run the same programs.
POSE_ARGS = ("--detect-resolution", "64", "--detector-size", "128", "--pose-batch-size", "4")


def worker(argv: list[str]) -> int:
    from anim_jax.cli import main
    from anim_jax.pose.extract import PoseExtractor

    extract_videos = PoseExtractor.extract_videos

    def logged(self, paths, **kwargs):
        paths = [os.fspath(p) for p in paths]
        print(MARK + os.environ["JAX_PROCESS_ID"] + ": " + json.dumps([os.path.basename(p) for p in paths]), flush=True)
        return extract_videos(self, paths, **kwargs)

    PoseExtractor.extract_videos = logged
    return main(["prepare", *argv])


def test_two_processes_share_the_videos_and_write_the_one_process_dataset(devices, tmp_path):
    import pose_helpers as ph
    from helpers import run_local_processes

    from anim_jax.parallel import make_mesh
    from anim_jax.pose.extract import Poses
    from data_pipelines import dataset as dataset_lib
    from data_pipelines import prepare as prep
    from data_pipelines.synthetic import write_synthetic_videos

    weights = ph.tiny_dwpose(tmp_path / "dwpose")
    clips = tmp_path / "clips"
    write_synthetic_videos(clips, 3, num_frames=2, height=48, width=64, fps=8.0, lossless=False)
    (clips / "broken.mp4").write_bytes(b"\x00" * 100)
    names = sorted(p.name for p in clips.iterdir())

    out = tmp_path / "ds"
    argv = [clips, "-o", out, "--extract-poses", "--pose-weights", weights, *POSE_ARGS, "--workers", "0", "--no-progress"]
    outputs = run_local_processes([sys.executable, os.path.abspath(__file__), *argv], timeout=TIMEOUT_S, cwd=HERE)

    # Every video (the unreadable one too) extracted once, by one process, and both had a share.
    shares = []
    for pid, text in enumerate(outputs):
        lines = [line for line in text.splitlines() if line.startswith(MARK)]
        assert len(lines) == 1 and lines[0].startswith(f"{MARK}{pid}: "), text[-3000:]
        shares.append(json.loads(lines[0].split(": ", 1)[1]))
    assert all(shares) and sorted(shares[0] + shares[1]) == names, shares
    assert "prepare: 3 of 4 videos written" in outputs[0] and "videos written" not in outputs[1]

    reference = tmp_path / "ref"
    prep.prepare(clips, reference, extract_poses=True, pose_weights=weights, pose_batch_size=4, workers=0,
                 progress=False, verbose=False,
                 pose_options=dict(detect_resolution=64, detector_input=(128, 128), mesh=make_mesh((4,), ("data",), devices[:4])))  # fmt: skip
    assert dataset_lib.is_complete(out) and not os.path.exists(prep.keypoints_dir(out))
    assert [s["id"] for s in dataset_lib.read_report(out)["skipped"]] == ["broken"]
    got, want = dataset_lib.open_dataset(out), dataset_lib.open_dataset(reference)
    assert len(got) == len(want) == 3
    for i in range(3):
        a, b = got[i], want[i]
        assert a["id"] == b["id"] and int(a["num_frames"]) == int(b["num_frames"]) == 2
        assert list(a["frames"]) == list(b["frames"]) and list(a["poses"]) == list(b["poses"])
        ka, kb = Poses.load(io.BytesIO(a["keypoints"])), Poses.load(io.BytesIO(b["keypoints"]))
        np.testing.assert_array_equal(ka.keypoints, kb.keypoints)
        np.testing.assert_array_equal(ka.scores, kb.scores)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(worker(sys.argv[1:]))

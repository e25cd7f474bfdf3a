"""Inference inputs are normalised to RGB with clear errors; outputs are written atomically."""

import av
import numpy as np
import pytest
from PIL import Image

from anim_jax import media


def test_image_modes_are_normalised(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest transparent
    out = np.asarray(media.to_rgb_image(Image.fromarray(rgba)))
    assert out.shape == (4, 5, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)  # composited on white
    gray = np.asarray(media.to_rgb_image(Image.fromarray(np.full((3, 3), 7, np.uint8))))
    assert (gray == 7).all()
    sixteen = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert (np.asarray(media.to_rgb_image(sixteen)) == 255).all()
    assert (np.asarray(media.to_rgb_image(np.full((2, 2, 3), 0.5))) == 128).all()


@pytest.mark.parametrize(
    "bad,match",
    [(np.zeros((2, 2, 5), np.uint8), r"expected \(H, W\)"), (np.full((2, 2, 3), 2.0), r"must be in \[0, 1\]"),
     (np.zeros((2, 2, 3), np.int32), "dtype int32")],
)
def test_bad_arrays_are_refused(bad, match):
    with pytest.raises(media.InputError, match=match):
        media.to_rgb_image(bad)


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(media.InputError, match="nope.png"):
        media.to_rgb_image(tmp_path / "nope.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(media.InputError, match="junk.png.*not a readable image"):
        media.to_rgb_image(junk)
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(b"\x00" * 100)
    with pytest.raises(media.InputError, match="bad.mp4"):
        media.load_pose_frames(bad_video)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(media.InputError, match="contains no images"):
        media.load_pose_frames(empty)


def test_mp4_gif_round_trip_and_pose_loading(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(np.repeat(rng.integers(0, 255, (6, 5, 7, 3), dtype=np.uint8), 4, 1), 4, 2)  # 20x28
    media.write_mp4(tmp_path / "v.mp4", frames, fps=12)
    poses, fps = media.load_pose_frames(tmp_path / "v.mp4")
    assert len(poses) == 6 and fps == 12 and poses[0].size == (28, 20)
    assert np.abs(np.asarray(poses[2], np.float32) - frames[2]).mean() < 20  # lossy H.264 of noise blocks
    assert len(media.load_pose_frames(tmp_path / "v.mp4", max_frames=4)[0]) == 4
    media.write_gif(tmp_path / "v.gif", frames, fps=12)
    with Image.open(tmp_path / "v.gif") as g:
        assert g.n_frames == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v.mp4"]  # no temporary files left


def test_odd_sized_mp4_is_padded_to_even(tmp_path):
    media.write_mp4(tmp_path / "o.mp4", np.zeros((2, 9, 11, 3), np.uint8))
    with av.open(str(tmp_path / "o.mp4")) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (12, 10)


def test_pose_folder_is_sorted_by_name(tmp_path):
    for i, v in [(2, 30), (0, 10), (1, 20)]:
        Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(tmp_path / f"p{i}.png")
    frames, fps = media.load_pose_frames(tmp_path)
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [10, 20, 30] and fps is None


def test_side_by_side_repeats_images_and_pads():
    video = np.ones((3, 4, 5, 3), np.uint8)
    image = np.full((4, 6, 3), 9, np.uint8)
    grid = media.side_by_side([image, video], pad=2)
    assert grid.shape == (3, 4, 6 + 2 + 5, 3)
    assert (grid[:, :, :6] == 9).all() and (grid[:, :, 6:8] == 0).all()

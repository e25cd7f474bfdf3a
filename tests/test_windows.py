"""Long-video context windows: Moore's closed-loop `uniform` schedule and our open variant."""

import pathlib

import numpy as np
import pytest

from anim_jax.diffusion import context_windows, window_weights, windows_array


# Moore-AnimateAnyone's own ``src/pipelines/context.py:uniform(0, 25, F, size, 1, overlap, True)``
# (step 0, context_stride 1, closed loop: how its pipeline calls it), run on its pinned commit;
# key "F_size_overlap" (tests/data/README.md).
MOORE_WINDOWS = np.load(pathlib.Path(__file__).parent / "data" / "moore_context_windows.npz")


def test_moore_documented_30_frames():
    ws = context_windows(30)
    assert ws == [list(range(0, 24)), list(range(20, 30)) + list(range(0, 14))]


def test_moore_documented_64_frames():
    ws = context_windows(64)
    assert ws == [
        list(range(0, 24)),
        list(range(20, 44)),
        list(range(40, 64)),
        list(range(60, 64)) + list(range(0, 20)),
    ]
    counts = window_weights(ws, 64)
    twice = set(range(0, 24)) | set(range(40, 44)) | set(range(60, 64))
    assert counts.tolist() == [2 if f in twice else 1 for f in range(64)]


def test_moore_documented_100_frames():
    ws = context_windows(100)
    assert len(ws) == 5
    assert ws[-1] == list(range(80, 100)) + list(range(0, 4))
    assert [w[0] for w in ws] == [0, 20, 40, 60, 80]


@pytest.mark.parametrize("num_frames", [1, 5, 23, 24])
@pytest.mark.parametrize("closed_loop", [True, False])
def test_short_videos_are_one_window(num_frames, closed_loop):
    assert context_windows(num_frames, closed_loop=closed_loop) == [list(range(num_frames))]
    assert windows_array(num_frames, closed_loop=closed_loop).shape == (1, num_frames)


def test_closed_loop_is_moore_uniform():
    assert len(MOORE_WINDOWS.files) == 84
    for key in MOORE_WINDOWS.files:
        num_frames, context_size, overlap = map(int, key.split("_"))
        assert windows_array(num_frames, context_size, overlap).tolist() == MOORE_WINDOWS[key].tolist(), key


@pytest.mark.parametrize("num_frames", [25, 30, 43, 44, 45, 64, 100, 121, 333])
@pytest.mark.parametrize("context_size,overlap", [(24, 4), (16, 0), (8, 7), (1, 0)])
def test_open_schedule(num_frames, context_size, overlap):
    ws = context_windows(num_frames, context_size, overlap, closed_loop=False)
    for w in ws:
        assert len(w) == context_size
        assert w == list(range(w[0], w[0] + context_size))  # contiguous: never wraps
        assert 0 <= w[0] and w[-1] < num_frames
    assert ws[-1][-1] == num_frames - 1
    counts = window_weights(ws, num_frames)
    assert counts.min() >= 1  # every frame covered
    starts = [w[0] for w in ws]
    assert starts == sorted(set(starts))
    # all but the last window sit on Moore's stride; the last is shifted back to end at the last frame
    stride = context_size - overlap
    assert starts[:-1] == [i * stride for i in range(len(starts) - 1)]
    assert starts[-1] == num_frames - context_size


def test_open_examples():
    assert [w[0] for w in context_windows(30, closed_loop=False)] == [0, 6]
    assert [w[0] for w in context_windows(64, closed_loop=False)] == [0, 20, 40]
    assert [w[0] for w in context_windows(100, closed_loop=False)] == [0, 20, 40, 60, 76]


def test_windows_array_and_weights():
    arr = windows_array(64)
    assert arr.shape == (4, 24) and arr.dtype == np.int32
    assert arr.tolist() == context_windows(64)
    # scatter-add then divide by the counts is the plain average over overlaps
    x = np.arange(64, dtype=np.float32)
    acc = np.zeros(64, np.float32)
    np.add.at(acc, arr, x[arr])
    np.testing.assert_array_equal(acc / window_weights(arr, 64), x)


def test_window_weights_errors():
    with pytest.raises(ValueError, match="covered by no window"):
        window_weights([[0, 1]], 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        window_weights([[0, 1, 3]], 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(num_frames=30, context_size=0, overlap=0), "context_size"),
        (dict(num_frames=30, context_size=24, overlap=24), "overlap"),
        (dict(num_frames=30, context_size=24, overlap=30), "overlap"),
        (dict(num_frames=30, overlap=-1), "overlap"),
        (dict(num_frames=30.5), "integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        context_windows(**kwargs)
    with pytest.raises(ValueError, match=match):
        windows_array(**kwargs)

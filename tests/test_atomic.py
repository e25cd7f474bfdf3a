"""Every writer goes through anim_jax.atomic: ordinary permissions, nothing half-written left behind."""

import os
import stat

import numpy as np
import pytest

from anim_jax import atomic, media, weights_dir
from anim_jax.convert.readers import read_safetensors, write_safetensors
from anim_jax.convert.torch_writer import save_torch_state_dict


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_directories_get_the_ordinary_mode(tmp_path, umask):
    """What open(path, "w") and mkdir would give: 0o666 / 0o777 minus the umask (not mkstemp's 0600)."""
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    writers = {
        "a.txt": lambda p: atomic.write_text(p, "hello"),
        "b.bin": lambda p: atomic.write_bytes(p, b"\x00\x01"),
        "c.safetensors": lambda p: write_safetensors(p, {"x": np.ones(3, np.float32)}),
        "d.pth": lambda p: save_torch_state_dict(p, {"x": np.ones(3, np.float32)}),
        "e.gif": lambda p: media.write_gif(p, frames),
        "f.mp4": lambda p: media.write_mp4(p, frames),
    }
    for name, write in writers.items():
        write(tmp_path / name)
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    with atomic.atomic_dir(tmp_path / "dir") as d:
        weights_dir.write_config(d, {"x": 1})
    assert mode(tmp_path / "dir") == 0o777 & ~umask
    assert mode(tmp_path / "dir" / weights_dir.CONFIG_NAME) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*writers, "dir"])  # no temporary left


class Boom(Exception):
    pass


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "w.safetensors"
    write_safetensors(target, {"x": np.zeros(2, np.float32)})

    class Exploding:
        shape, dtype = (4,), np.dtype(np.float32)

        def __array__(self, dtype=None, copy=None):
            raise Boom

    for write in (lambda: write_safetensors(target, {"x": Exploding()}),
                  lambda: save_torch_state_dict(target, {"x": Exploding()})):
        with pytest.raises(Boom):
            write()
        assert os.listdir(tmp_path) == ["w.safetensors"]
        np.testing.assert_array_equal(read_safetensors(target)["x"], np.zeros(2, np.float32))
    with pytest.raises(Boom), atomic.atomic_open(tmp_path / "new.txt", "w") as f:
        f.write("partial")
        raise Boom
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_directory_swap_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as d:
        (d / "one").write_text("1")
    with pytest.raises(Boom), atomic.atomic_dir(out) as d:
        (d / "two").write_text("2")
        raise Boom
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and os.listdir(out) == ["one"]
    with atomic.atomic_dir(out) as d:  # replacing a complete directory
        (d / "three").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and os.listdir(out) == ["three"]

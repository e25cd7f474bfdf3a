"""TensorBoard event files without TensorFlow, tensorboard or tensorboardX; MFU.

An event file is a sequence of TFRecords (``uint64 length, uint32 masked_crc32c(length), data,
uint32 masked_crc32c(data)``, little-endian), each an ``Event`` protobuf. We hand-encode the few
messages needed (field numbers from tensorboard's ``event.proto`` / ``summary.proto``)::

    Event    { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary  { repeated Value value = 1; }
    Value    { string tag = 1; float simple_value = 2; Image image = 4; }
    Image    { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }

TensorBoard shows ``simple_value`` under Scalars and ``Image`` under Images (PNG for images, GIF
for videos: the Images dashboard plays animated GIFs). ``write_video`` also writes the GIF beside
the event file (``<logdir>/videos/<tag>_<step>.gif``) for viewing without TensorBoard.

Only process 0 should write (``MetricWriter(logdir, enabled=jax.process_index() == 0)``). The
event file is an append-only log, as TensorBoard expects, one per writer (time, host and pid in
its name); a record cut short by a crash is incomplete and readers stop before it.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time
from typing import Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), masked as TFRecord wants it
# --------------------------------------------------------------------------------------------


def _crc_table() -> list[int]:
    poly = 0x82F63B78
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# --------------------------------------------------------------------------------------------
# A minimal protobuf encoder
# --------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _f_varint(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(int(n))


def _f_double(field: int, x: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", float(x))


def _f_float(field: int, x: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", float(x))


def _f_bytes(field: int, b: bytes | str) -> bytes:
    if isinstance(b, str):
        b = b.encode("utf-8")
    return _key(field, 2) + _varint(len(b)) + b


def _event(step: int, wall_time: float, *, summary_values: Sequence[bytes] = (), file_version: str | None = None):
    msg = _f_double(1, wall_time) + _f_varint(2, step)
    if file_version is not None:
        msg += _f_bytes(3, file_version)
    if summary_values:
        msg += _f_bytes(5, b"".join(_f_bytes(1, v) for v in summary_values))
    return msg


def scalar_value(tag: str, value: float) -> bytes:
    return _f_bytes(1, tag) + _f_float(2, value)


def image_value(tag: str, encoded: bytes, height: int, width: int, channels: int) -> bytes:
    image = _f_varint(1, height) + _f_varint(2, width) + _f_varint(3, channels) + _f_bytes(4, encoded)
    return _f_bytes(1, tag) + _f_bytes(4, image)


# --------------------------------------------------------------------------------------------
# Image / video encoding
# --------------------------------------------------------------------------------------------


def to_uint8(image) -> np.ndarray:
    """(H, W[, C]) float in [0, 1] or uint8 -> uint8 (H, W, C)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    return a


def encode_png(image) -> bytes:
    from PIL import Image

    a = to_uint8(image)
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def encode_gif(frames, fps: float = 8.0) -> bytes:
    from PIL import Image

    ims = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in (to_uint8(x) for x in frames)]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=int(round(1000 / fps)), loop=0)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


class MetricWriter:
    """Appends TensorBoard events to ``<logdir>/events.out.tfevents.<time>.<host>``.

    ``enabled=False`` makes every call a no-op (the non-zero processes of a multi-host run).
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True, filename_suffix: str = ""):
        self.logdir = os.fspath(logdir)
        self.enabled = enabled
        self._file = None
        self.path = None
        if enabled:
            os.makedirs(self.logdir, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}{filename_suffix}"
            self.path = os.path.join(self.logdir, name)
            self._file = open(self.path, "ab")
            self._write(_event(0, time.time(), file_version="brain.Event:2"))
            self.flush()

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Non-finite values are skipped (TensorBoard cannot plot them)."""
        if not self.enabled:
            return
        values = []
        for tag, v in scalars.items():
            v = float(np.asarray(v))
            if np.isfinite(v):
                values.append(scalar_value(tag, v))
        if values:
            self._write(_event(int(step), time.time(), summary_values=values))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """(H, W[, C]) images, uint8 or float in [0, 1], stored as PNG."""
        if not self.enabled:
            return
        values = []
        for tag, im in images.items():
            a = to_uint8(im)
            values.append(image_value(tag, encode_png(a), a.shape[0], a.shape[1], a.shape[2]))
        self._write(_event(int(step), time.time(), summary_values=values))

    def write_video(self, step: int, tag: str, frames, fps: float = 8.0) -> str | None:
        """(F, H, W[, C]) frames as an animated GIF: an image event and ``videos/<tag>_<step>.gif``.
        Returns the GIF's path."""
        if not self.enabled:
            return None
        frames = [to_uint8(f) for f in frames]
        gif = encode_gif(frames, fps)
        h, w, c = frames[0].shape
        self._write(_event(int(step), time.time(), summary_values=[image_value(tag, gif, h, w, c)]))
        path = os.path.join(self.logdir, "videos", f"{tag.replace('/', '_')}_{int(step):08d}.gif")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(gif)
        os.replace(tmp, path)  # readers never see a partial file
        return path

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# --------------------------------------------------------------------------------------------
# Throughput helpers
# --------------------------------------------------------------------------------------------


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_device: float, num_devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak FLOP/s.

    ``flops_per_step`` counts the whole (global) step's model FLOPs, e.g. 3x the forward FLOPs of
    trained modules (forward + backward) plus 1x those of frozen ones; rematerialisation is not
    counted (that would be hardware FLOPs utilisation).
    """
    if step_time_s <= 0 or peak_flops_per_device <= 0 or num_devices <= 0:
        return float("nan")
    return float(flops_per_step) / (float(step_time_s) * float(peak_flops_per_device) * int(num_devices))


# Dense bf16 peak FLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "h100": 989e12,  # H100 SXM
    "h200": 989e12,
    "a100": 312e12,
    "v5p": 459e12,
    "v5e": 197e12,
    "v6e": 918e12,
    "v4": 275e12,
}


def peak_flops_per_device(device=None) -> float | None:
    """A best guess of one device's dense bf16 peak from its ``device_kind``; None when unknown."""
    if device is None:
        import jax

        device = jax.devices()[0]
    kind = getattr(device, "device_kind", "").lower().replace(" ", "")
    for key in ("h200", "h100", "a100", "v5p", "v6e", "v4"):
        if key in kind:
            return PEAK_BF16_FLOPS[key]
    if "v5lite" in kind or "v5e" in kind:
        return PEAK_BF16_FLOPS["v5e"]
    if "v6lite" in kind:
        return PEAK_BF16_FLOPS["v6e"]
    if kind == "tpuv5":  # v5p reports itself as "TPU v5"
        return PEAK_BF16_FLOPS["v5p"]
    return None


def timestep_bucket_losses(per_example_loss, timesteps, num_buckets: int = 4, num_train_timesteps: int = 1000):
    """Mean loss per timestep bucket (jit-friendly): ``{"loss_t/000-249": ..., ...}``; a bucket with
    no example in the batch is NaN, which the train loop's window average ignores."""
    import jax.numpy as jnp

    width = num_train_timesteps // num_buckets
    bucket = jnp.clip(jnp.asarray(timesteps) // width, 0, num_buckets - 1)
    loss = jnp.asarray(per_example_loss, jnp.float32)
    out = {}
    for b in range(num_buckets):
        sel = bucket == b
        n = sel.sum()
        lo, hi = b * width, (b + 1) * width - 1 if b < num_buckets - 1 else num_train_timesteps - 1
        out[f"loss_t/{lo:03d}-{hi:03d}"] = jnp.where(n > 0, jnp.where(sel, loss, 0.0).sum() / jnp.maximum(n, 1), jnp.nan)
    return out

"""Training logs: TensorBoard event files (through tensorboardX, no TensorFlow) and ``metrics.jsonl``; MFU.

``MetricWriter(logdir)`` writes, in ``logdir``:

* ``events.out.tfevents.*``: scalars, images (PNG) and sample videos (animated GIF image summaries:
  TensorBoard's Images dashboard plays them), for TensorBoard;
* ``metrics.jsonl``: one JSON object per ``write_scalars`` call, ``{"step": ..., "wall_time": ...,
  <tag>: <value>, ...}``, for programs (the demo's loss plot, tests) that should not parse event
  files. Lines are appended and flushed with the events; a line cut short by a crash is skipped by
  :func:`read_metrics`;
* ``videos/<tag>_<step>.gif``: each sample video, for viewing without TensorBoard.

Only process 0 should write (``MetricWriter(logdir, enabled=jax.process_index() == 0)``).
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from typing import Mapping

import numpy as np

from anim_jax import atomic, storage

METRICS_FILE = "metrics.jsonl"


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
    """TensorBoard events and ``metrics.jsonl`` in ``logdir`` (see the module docstring).

    ``enabled=False`` makes every call a no-op (the non-zero processes of a multi-host run).

    A URL ``logdir`` (``gs://...``): objects cannot be appended to, so both files are written in a
    local temporary folder and uploaded whole (one object each, replacing the previous upload) on
    ``flush`` at most every ``upload_every_s`` seconds, and on ``close``; an existing
    ``metrics.jsonl`` there is downloaded first, so a resumed run appends to it.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True, filename_suffix: str = "",
                 upload_every_s: float = 30.0):
        self.remote = str(logdir) if storage.is_url(logdir) else None
        self.logdir = tempfile.mkdtemp(prefix="anim-jax-logs-") if self.remote and enabled else os.fspath(logdir)
        self.enabled = enabled
        self._tb = self._jsonl = None
        self.path = None
        self._upload_every_s, self._uploaded_at = upload_every_s, time.monotonic()
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(self.logdir, exist_ok=True)
            if self.remote and (storage.as_path(self.remote) / METRICS_FILE).is_file():
                storage.download(f"{self.remote}/{METRICS_FILE}", os.path.join(self.logdir, METRICS_FILE))
            # A unique suffix keeps two writers started in the same second (restarts, tests) apart and
            # finds this writer's file without tensorboardX internals.
            unique = f".{os.getpid()}.{secrets.token_hex(3)}{filename_suffix}"
            self._tb = SummaryWriter(self.logdir, filename_suffix=unique, flush_secs=30)
            self._tb.flush()  # creates the event file
            (self.path,) = glob.glob(os.path.join(glob.escape(self.logdir), f"events.out.tfevents.*{glob.escape(unique)}"))
            self._event_file = self.path
            if self.remote:
                self.path = f"{self.remote}/{os.path.basename(self.path)}"
            self._jsonl = open(os.path.join(self.logdir, METRICS_FILE), "a", encoding="utf-8", buffering=1)  # line-buffered

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Non-finite values are skipped (TensorBoard cannot plot them, JSON cannot hold them)."""
        if not self.enabled:
            return
        now = time.time()
        record: dict[str, float] = {}
        for tag, v in scalars.items():
            v = float(np.asarray(v))
            if math.isfinite(v):
                self._tb.add_scalar(tag, v, int(step), walltime=now)
                record[tag] = v
        if record:
            self._jsonl.write(json.dumps({"step": int(step), "wall_time": now, **record}) + "\n")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """(H, W[, C]) images, uint8 or float in [0, 1], stored as PNG."""
        if not self.enabled:
            return
        for tag, im in images.items():
            self._tb.add_image(tag, to_uint8(im), int(step), dataformats="HWC")

    def write_video(self, step: int, tag: str, frames, fps: float = 8.0) -> str | None:
        """(F, H, W[, C]) frames as an animated GIF: an image summary and ``videos/<tag>_<step>.gif``.
        Returns the GIF's path."""
        if not self.enabled:
            return None
        # tensorboardX's add_video encodes through moviepy; a GIF from PIL in tensorboardX's own
        # image-summary message is what add_video writes, without that dependency.
        from tensorboardX.proto.summary_pb2 import Summary

        frames = [to_uint8(f) for f in frames]
        gif = encode_gif(frames, fps)
        h, w, c = frames[0].shape
        image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif)
        self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), int(step))
        name = f"{tag.replace('/', '_')}_{int(step):08d}.gif"
        path = f"{self.remote}/videos/{name}" if self.remote else os.path.join(self.logdir, "videos", name)
        atomic.write_bytes(path, gif)
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._jsonl.flush()
            if self.remote and time.monotonic() - self._uploaded_at >= self._upload_every_s:
                self._upload()

    def _upload(self) -> None:
        for name in (os.path.basename(self._event_file), METRICS_FILE):
            storage.upload_file(os.path.join(self.logdir, name), f"{self.remote}/{name}")
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None
            if self.remote:
                self._upload()
                shutil.rmtree(self.logdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_metrics(logdir: str | os.PathLike) -> list[dict]:
    """The records of ``<logdir>/metrics.jsonl`` in file order (a last line cut short is skipped)."""
    path = storage.as_path(logdir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line still being written
    return out


def scalar_series(logdir: str | os.PathLike, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one scalar from ``metrics.jsonl``, sorted by step (the last value of a
    step wins)."""
    points = {int(r["step"]): float(r[tag]) for r in read_metrics(logdir) if tag in r}
    return sorted(points.items())


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

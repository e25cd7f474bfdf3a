"""The CPU benchmarks' shared start: a converted weights directory as an ``AnimatePipeline`` on N
one-thread CPU devices (as ``anim-jax animate --cpu-devices N``)."""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def weights_error(weights: str) -> str | None:
    """The one-line usage error for ``--weights``, or None when it is a converted weights directory."""
    if pathlib.Path(weights, "anim_jax.json").is_file():
        return None
    return f"error: --weights {weights}: no anim_jax.json there (a converted weights directory)"


def int_list(low: int):
    """An argparse ``type``: comma-separated integers, each at least ``low`` (argparse reports a bad
    value in one line and exits with 2)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"values must be >= {low}, got {text}")
        return values

    return parse


def cpu_pipeline(weights: str, attention: str, devices: int):
    """``(pipeline, mesh)``: jax set up with ``devices`` one-thread CPU devices (call this before
    anything imports jax), the mesh over them (None for one), the pipeline with that attention."""
    sys.path.insert(0, str(REPO))
    from anim_jax import parallel

    parallel.use_cpu_devices(devices)
    from anim_jax.models.attention_ops import AttentionConfig
    from anim_jax.pipeline import AnimatePipeline

    mesh = parallel.make_mesh((devices,), ("data",)) if devices > 1 else None
    return AnimatePipeline.from_pretrained(weights, attention=AttentionConfig(attention), mesh=mesh), mesh

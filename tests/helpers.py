"""Test helpers shared by several test modules (one place, not copies)."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx


def randomise(module, seed: int, scale: float = 0.2) -> None:
    """Every parameter drawn from N(0, scale): zero-initialised layers (PoseGuider ``conv_out``)
    must matter too."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        var.value = jnp.asarray(rng.normal(0, scale, var.shape), var.dtype)


def tiny_components(seed: int = 0) -> dict:
    """The five networks at the smallest useful size (2x VAE, 2-level UNet), random weights."""
    from anim_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
    from anim_jax.models.pose_guider import PoseGuider
    from anim_jax.models.unet import UNet2DConditionModel, UNetConfig
    from anim_jax.models.vae import AutoencoderKL, VAEConfig

    unet = UNetConfig(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, num_attention_heads=2,
        cross_attention_dim=16, norm_num_groups=8,
    )
    rngs = nnx.Rngs(seed)
    parts = dict(
        denoiser=UNet2DConditionModel(unet, rngs=rngs),
        reference_net=UNet2DConditionModel(unet, reference_net=True, rngs=rngs),
        pose_guider=PoseGuider(16, (4, 8), rngs=rngs),  # 2x down, like the tiny VAE
        vae=AutoencoderKL(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4), rngs=rngs),
        image_encoder=CLIPVisionModelWithProjection(
            CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                             image_size=16, patch_size=4, projection_dim=16), rngs=rngs),
    )
    for i, m in enumerate(parts.values()):
        randomise(m, seed + i)
    return parts


def write_tiny_weights(directory, *, seed: int = 0, native: dict | None = None) -> pathlib.Path:
    """A converted-weights directory (as ``anim-jax convert`` writes) of ``tiny_components``;
    ``native`` is recorded as the weights' native settings (``anim_jax.native``)."""
    from anim_jax import native as native_lib
    from anim_jax.convert.components import save_components
    from anim_jax.diffusion import moore_inference_schedule

    directory = pathlib.Path(directory)
    save_components(directory, tiny_components(seed), schedule=moore_inference_schedule(),
                    extra={native_lib.KEY: native} if native else None)
    return directory


def subprocess_xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a test's subprocess: the suite's options (tests/conftest.py) with the fake CPU
    device count set to ``devices`` (None: XLA's one device, as a user's process has)."""
    import os

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def run_local_processes(argv: list[str], num_processes: int = 2, *, local_devices: int = 4, timeout: float = 120,
                        cwd=None) -> list[str]:
    """Runs ``argv`` as ``num_processes`` jax.distributed processes on localhost (each with
    ``local_devices`` CPU devices, gloo collectives, the coordinator bound to loopback only) with the
    JAX_* environment ``launch/local.sh`` sets, and returns each process's output (stdout + stderr).
    Fails the test when they run past ``timeout`` seconds (all are killed) or one exits non-zero."""
    import os
    import socket
    import subprocess

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(num_processes):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS=subprocess_xla_flags(local_devices),
            JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(num_processes),
            JAX_PROCESS_ID=str(pid),
        )
        procs.append(subprocess.Popen([str(a) for a in argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=cwd))  # fmt: skip
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        raise AssertionError(f"{num_processes}-process run exceeded {timeout} s:\n" + "\n---\n".join(l[-3000:] for l in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {pid} exited with {p.returncode}:\n{out[-5000:]}"
    return outputs

"""The one attention function every attention layer calls.

Layout is ``(batch, length, heads, head_dim)`` for q, k and v (the layout of
``jax.nn.dot_product_attention``). The implementation is a config choice:

* ``"xla"``: einsum -> float32 softmax -> einsum. Exact reference; the default.
* ``"chunked"``: the same maths over query chunks (``jax.lax.map``), so the score matrix held at
  once is ``chunk x Lk`` instead of ``Lq x Lk``. This is what makes the reference-concat
  self-attention at the top UNet level fit (one unfused score matrix there is tens of GB).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention on
  NVIDIA GPUs; needs fp16/bf16 inputs).
* ``"auto"``: on GPU, cuDNN for half-precision inputs whose key sequence is at least
  ``fused_min_kv_length`` long (short ones — the 24-frame temporal attention, the single CLIP
  token — are cheaper as plain XLA than as a fused kernel launch per tiny problem); otherwise chunked
  once the score matrix would exceed ``chunk_threshold`` elements per batch-head, otherwise xla.

``kv_lengths`` (optional, int (B,)) makes batch row b attend only to its first ``kv_lengths[b]``
keys: the others get a -inf logit, i.e. probability exactly 0. Training uses it to switch reference
attention off per sample (the reference keys come after the frame's own keys).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    implementation: str = "xla"
    query_chunk_size: int = 1024
    # "auto" switches to the chunked path above this many score elements per (batch, head).
    chunk_threshold: int = 4096 * 4096
    fused_min_kv_length: int = 128

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention implementation {self.implementation!r} is not one of {IMPLEMENTATIONS}"
            )
        if self.query_chunk_size <= 0:
            raise ValueError(f"attention query_chunk_size must be positive, got {self.query_chunk_size}")


def _xla_attention(q, k, v, scale, kv_lengths=None):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_lengths is not None:
        valid = jnp.arange(k.shape[1]) < kv_lengths[:, None]
        scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _chunked_attention(q, k, v, scale, chunk, kv_lengths=None):
    lq = q.shape[1]
    if lq <= chunk:
        return _xla_attention(q, k, v, scale, kv_lengths)
    n = math.ceil(lq / chunk)
    pad = n * chunk - lq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qp.reshape(q.shape[0], n, chunk, *q.shape[2:]).swapaxes(0, 1)
    # remat each chunk so the backward pass also holds only one chunk's scores.
    out = jax.lax.map(jax.checkpoint(lambda qi: _xla_attention(qi, k, v, scale, kv_lengths)), qc)
    out = out.swapaxes(0, 1).reshape(q.shape[0], n * chunk, *v.shape[2:])
    return out[:, :lq]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, config: AttentionConfig | None = None, *, kv_lengths=None
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over (B, L, H, D) tensors; returns (B, Lq, H, D).

    ``kv_lengths``: None, or int (B,) in [1, Lk]: row b ignores keys/values from position
    ``kv_lengths[b]`` on (see the module docstring)."""
    config = config or AttentionConfig()
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (batch, length, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    scale = q.shape[-1] ** -0.5
    impl = config.implementation
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        fusable = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
        if on_gpu and fusable and k.shape[1] >= config.fused_min_kv_length:
            impl = "cudnn"
        elif q.shape[1] * k.shape[1] > config.chunk_threshold:
            impl = "chunked"
        else:
            impl = "xla"
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
        if kv_lengths.shape != (q.shape[0],):
            raise ValueError(f"kv_lengths must have shape ({q.shape[0]},), got {kv_lengths.shape}")
    if impl == "xla":
        return _xla_attention(q, k, v, scale, kv_lengths)
    if impl == "chunked":
        return _chunked_attention(q, k, v, scale, config.query_chunk_size, kv_lengths)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=kv_lengths, implementation="cudnn"
    )

"""transformers ``CLIPVisionModelWithProjection`` state-dict keys <-> ``anim_jax.models.clip``.

The NNX paths are the transformers keys (``vision_model.encoder.layers.0.self_attn.q_proj.weight``,
``vision_model.embeddings.position_embedding.weight``, ``visual_projection.weight``, ...).
``vision_model.embeddings.position_ids`` is a buffer (``arange``), saved by older transformers
(e.g. 4.30, which wrote ``sd-image-variations-diffusers/image_encoder``): it is ignored whether
present or not.
"""

from __future__ import annotations

from anim_jax.convert.mapping import KeyMap

CLIP_KEYMAP = KeyMap(ignored=(r"^vision_model\.embeddings\.position_ids$",))

"""Key maps between ``anim_jax.models.unet.UNet2DConditionModel`` and PyTorch state dicts.

Our module paths already are diffusers' (``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q``);
only two containers that diffusers indexes are plain attributes here:

* ``attn.to_out`` (a Linear) is diffusers' ``to_out.0`` (``to_out.1`` is a parameterless Dropout);
* ``ff.proj`` / ``ff.out`` are diffusers' ``ff.net.0.proj`` (GEGLU) / ``ff.net.2``.

The renames are anchored at the parameter leaf, so they are idempotent and compose (in any order)
with other maps that rename the same containers, e.g. the motion-module maps below.
The ReferenceNet (``reference_net=True``) uses the same map; its key set is the diffusers one minus
``conv_norm_out.*`` and ``conv_out.*``.

The denoiser with motion modules (``UNetConfig.motion``) keeps its motion modules at
``down_blocks.{i}.motion_modules.{j}``, ``mid_block.motion_modules.0`` and
``up_blocks.{i}.motion_modules.{j}``, each named like ``models.motion.MotionModule``:

* ``DENOISER_KEYMAP``: Moore-AnimateAnyone / AnimateDiff keys (the diffusers 2-D keys plus
  original-format motion keys ``...motion_modules.0.temporal_transformer...``); the ``pos_encoder.pe``
  buffers are ignored (recomputed; validate them with ``models.motion.check_pe_buffers``).
* ``DENOISER_KEYMAP_DIFFUSERS``: diffusers ``UNetMotionModel`` keys (the same 2-D keys plus
  ``MotionAdapter``-format motion keys); its ``pos_embed.pe`` buffers are ignored.

Both also serve a UNet without motion modules (they then act as ``UNET_KEYMAP``).
"""

from anim_jax.convert.mapping import KeyMap, compose
from anim_jax.convert.motion_keys import MOTION_KEYMAP_DIFFUSERS, MOTION_KEYMAP_ORIGINAL

UNET_KEYMAP = KeyMap(
    renames=(
        (r"\.to_out\.(kernel|bias)$", r".to_out.0.\1"),
        (r"\.ff\.proj\.(kernel|bias)$", r".ff.net.0.proj.\1"),
        (r"\.ff\.out\.(kernel|bias)$", r".ff.net.2.\1"),
    ),
)

DENOISER_KEYMAP = compose(UNET_KEYMAP, MOTION_KEYMAP_ORIGINAL)
DENOISER_KEYMAP_DIFFUSERS = compose(UNET_KEYMAP, MOTION_KEYMAP_DIFFUSERS)

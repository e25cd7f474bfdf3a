"""Key map between ``anim_jax.models.unet.UNet2DConditionModel`` and diffusers' state dict.

Our module paths already are diffusers' (``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q``);
only two containers that diffusers indexes are plain attributes here:

* ``attn.to_out`` (a Linear) is diffusers' ``to_out.0`` (``to_out.1`` is a parameterless Dropout);
* ``ff.proj`` / ``ff.out`` are diffusers' ``ff.net.0.proj`` (GEGLU) / ``ff.net.2``.

The renames are anchored at the parameter leaf, so they are idempotent and compose (in any order)
with other maps that rename the same containers, e.g. the motion-module map in a UNet3D.
The ReferenceNet (``reference_net=True``) uses the same map; its key set is the diffusers one minus
``conv_norm_out.*`` and ``conv_out.*``.
"""

from anim_jax.convert.mapping import KeyMap

UNET_KEYMAP = KeyMap(
    renames=(
        (r"\.to_out\.(kernel|bias)$", r".to_out.0.\1"),
        (r"\.ff\.proj\.(kernel|bias)$", r".ff.net.0.proj.\1"),
        (r"\.ff\.out\.(kernel|bias)$", r".ff.net.2.\1"),
    ),
)

"""Pose extraction: DWPose's person detector (YOLOX) and whole-body pose network (RTMPose) in Flax NNX,
the batched extractor, Moore's skeleton pictures and alignment to a reference body.

``anim_jax.pose.extract(frames, weights=...)`` and ``PoseExtractor`` (module ``extract``),
``anim_jax.pose.render`` (module ``render``: Moore's ``draw_pose``). The two functions shadow their
modules as attributes of this package; import from the modules with ``from anim_jax.pose.extract
import ...``.
"""

from anim_jax.pose.extract import PoseExtractor, Poses, extract  # noqa: F401
from anim_jax.pose.render import render_pose as render  # noqa: F401

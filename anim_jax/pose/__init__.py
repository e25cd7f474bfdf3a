"""DWPose in JAX: person detection, whole-body keypoints, Moore's skeleton pictures, alignment.

``anim_jax.pose.extract(frames, weights=...)`` and ``PoseExtractor`` (``extract.py``), ``render``
(``render.py``: Moore's ``draw_pose``), ``align`` (``align.py``: retargeting to a reference body).
Note: the functions ``extract`` and ``render`` shadow their submodules as attributes of this
package; import the modules with ``from anim_jax.pose import extract as _`` style only via
``importlib`` or use ``from anim_jax.pose.extract import ...``.
"""

from anim_jax.pose.extract import PoseExtractor, Poses, extract  # noqa: F401
from anim_jax.pose.render import render_pose as render  # noqa: F401

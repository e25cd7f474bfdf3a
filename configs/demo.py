"""The built-in demo's training configs (``anim-jax demo`` uses ``anim_jax/recipes/demo.py`` directly;
its docstring says where the demo departs from Moore's recipe and why).

    anim-jax train --config configs/demo.py:stage1 ...      # stage1 | stage2, optional ",quick"
"""

from anim_jax.recipes import demo


def get_config(arg: str | None = None):
    return demo.get_config(arg)

"""Stage 2 training config: the motion modules on video clips (the recipe and its fields are
documented in ``anim_jax/recipes/stage2.py``).

    anim-jax train --config configs/stage2.py --workdir runs/s2 --config.init.weights_dir=runs/s1/export ...
    anim-jax train --config configs/stage2.py:tiny ...      # CPU-sized models and data

A config file is loaded by path (``anim_jax.configlib``); copy this one and change fields in
``get_config`` to make your own recipe.
"""

from anim_jax.recipes import stage2


def get_config(arg: str | None = None):
    return stage2.get_config(arg)

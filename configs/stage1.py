"""Stage 1 training config: Moore-AnimateAnyone's first stage (the recipe and its fields are
documented in ``anim_jax/recipes/stage1.py``).

    anim-jax train --config configs/stage1.py --workdir runs/s1 --config.data.dataset=... --config.init.weights_dir=...
    anim-jax train --config configs/stage1.py:tiny ...      # CPU-sized models and data

A config file is loaded by path (``anim_jax.configlib``); copy this one and change fields in
``get_config`` to make your own recipe.
"""

from anim_jax.recipes import stage1


def get_config(arg: str | None = None):
    return stage1.get_config(arg)

"""The built-in demo's training configs (``anim-jax demo`` uses ``anim_jax/recipes/demo.py`` directly;
its docstring says where the demo departs from Moore's recipe and why).

    anim-jax train --config configs/demo.py:stage1 ...      # stage1 | stage2, optional ",cpu" or ",quick"

(``anim-jax demo --train`` renders its training records in memory; ``anim-jax train`` with this
config needs ``--config.data.dataset=DIR``, e.g. from ``data_pipelines.synthetic.write_synthetic_dataset(
DIR, n, palette="train", backgrounds=("plain",))``.)
"""

from anim_jax.recipes import demo


def get_config(arg: str | None = None):
    return demo.get_config(arg)

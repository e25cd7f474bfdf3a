"""The old home of Animate Anyone training, kept so that existing imports keep working.

Its parts now live in small modules: the model in ``anim_jax.models.animate_anyone``, sampling in
``anim_jax.diffusion.sampling``, and under ``anim_jax.train``: ``batches`` (batch format),
``loss``, ``architecture`` (config -> architecture), ``weights`` (initialisation from
sources), ``stages`` (trainable sets), ``setup`` (mesh, state, jitted step), ``flops``,
``schedules``, ``data``, ``validation`` and ``run``; remat in ``anim_jax.models.remat``.
"""

from anim_jax.models.animate_anyone import COMPONENTS, AnimateAnyone
from anim_jax.models.animate_anyone import AnimateAnyone as AnimateAnyoneModel
from anim_jax.train.architecture import attention_config, build_model, component_configs, compute_dtype
from anim_jax.train.batches import BATCH_KEYS, as_video_batch, batch_shardings, batch_spec
from anim_jax.train.flops import compiled_flops, flops_config, step_flops
from anim_jax.train.loss import LossConfig, make_loss_fn
from anim_jax.models.remat import POLICIES as REMAT_POLICIES
from anim_jax.models.remat import apply_remat
from anim_jax.train.schedules import export_schedule, training_schedule, validation_schedule
from anim_jax.train.setup import Trainer, global_batch_size, mesh_from_config, rules_from_config, setup
from anim_jax.train.stages import last_up_block, trainable_filter
from anim_jax.train.validation import sample_videos
from anim_jax.train.weights import assign, flat_arrays, init_model, load_motion_modules, read_train_checkpoint, read_weights_file

__all__ = [
    "AnimateAnyone", "AnimateAnyoneModel", "BATCH_KEYS", "COMPONENTS", "LossConfig", "REMAT_POLICIES", "Trainer",
    "apply_remat", "as_video_batch", "assign", "attention_config", "batch_shardings", "batch_spec", "build_model",
    "compiled_flops", "component_configs", "compute_dtype", "export_schedule", "flat_arrays", "flops_config",
    "global_batch_size", "init_model", "last_up_block", "load_motion_modules", "make_loss_fn", "mesh_from_config",
    "read_train_checkpoint", "read_weights_file", "rules_from_config", "sample_videos", "setup", "step_flops",
    "trainable_filter", "training_schedule", "validation_schedule",
]

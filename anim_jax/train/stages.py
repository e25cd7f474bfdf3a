"""What a training stage trains: the trainable mask from regexes on parameter paths."""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from anim_jax.models.animate_anyone import AnimateAnyone
from anim_jax.train import optim
from anim_jax.train.weights import _is_motion

def last_up_block(model: AnimateAnyone) -> int:
    return len(model.reference_net.up_blocks) - 1


def trainable_filter(model: AnimateAnyone, stage: int, include: Sequence[str] = (),
                     exclude: Sequence[str] = ()) -> optim.TrainableFilter:
    """Stage 1: denoiser, ReferenceNet except its last up block, PoseGuider. Stage 2: the motion
    modules. Non-empty ``include``/``exclude`` replace the stage's patterns (regexes on paths)."""
    if stage == 1:
        inc = (r"^denoiser\.", r"^reference_net\.", r"^pose_guider\.")
        exc = (rf"^reference_net\.up_blocks\.{last_up_block(model)}\.",)
        if any(_is_motion(optim.path_str(p)) for p, _ in nnx.to_flat_state(nnx.state(model.denoiser, nnx.Param))):
            raise ValueError("stage 1 trains a denoiser without motion modules; config.model.motion must be unset")
    elif stage == 2:
        inc, exc = (r"^denoiser\..*\.motion_modules\.",), ()
    else:
        raise ValueError(f"config.stage must be 1 or 2, got {stage}")
    return optim.trainable_mask(model, include=tuple(include) or inc, exclude=tuple(exclude) or exc)

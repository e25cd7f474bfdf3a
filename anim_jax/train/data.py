"""Training data on the device: the Grain pipeline a config describes, as global sharded batches."""

from __future__ import annotations

from data_pipelines import grain_pipeline


def data_config(cfg, global_batch: int, *, seed_offset: int = 0, batch_size: int | None = None, in_memory: bool = False):
    d = cfg.data
    if not d.dataset and not in_memory:
        raise ValueError("config.data.dataset is not set: pass --config.data.dataset=DIR (a dataset from `anim-jax prepare`)")
    return grain_pipeline.data_config(
        path=str(d.dataset), stage=int(cfg.stage), resolution=tuple(d.resolution), sample_margin=int(d.sample_margin),
        n_frames=int(d.n_frames), sample_rate=int(d.sample_rate), clip_size=int(d.clip_size),
        seed=int(d.seed) + seed_offset, batch_size=int(batch_size or global_batch), num_workers=int(d.num_workers),
        read_threads=int(d.read_threads), prefetch=int(d.prefetch), uint8_output=bool(d.uint8_output),
        crop_scale=d.get("crop_scale", None),
    )


class DeviceBatches:
    """This host's Grain batches as global, sharded ``jax.Array``s (without ``index``);
    ``get_state``/``set_state`` are Grain's, so the checkpoint holds the position."""

    def __init__(self, cfg, trainer, source=None):
        """``source``: records in memory (``grain_pipeline.make_map_dataset``'s ``source``) instead
        of the dataset directory ``cfg.data.dataset``."""
        self.trainer = trainer
        config = data_config(cfg, trainer.global_batch_size, in_memory=source is not None)
        self._it = iter(grain_pipeline.make_iter_dataset(config, source))

    def __iter__(self):
        return self

    def __next__(self):
        return self.trainer.put_batch(next(self._it))

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)

    def close(self):
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

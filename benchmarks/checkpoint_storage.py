"""Checkpoint save and restore time: local disk against a gs:// bucket (the Cloud Storage emulator).

    python benchmarks/checkpoint_storage.py                 # tiny stage-1 state + a sample of the full one
    python benchmarks/checkpoint_storage.py --sample-mb 1024 --json out.json

Two train states, each saved (synchronously: the time until the checkpoint is committed) and
restored onto its abstract target with ``anim_jax.checkpoint.CheckpointManager``, ``--repeats``
times (median), into a local temporary folder and into ``gs://`` on fake-gcs-server (started here
like in tests/gcs_emulator.py, in memory, on localhost):

* ``tiny``: the stage-1 ``:tiny`` train state (parameters, Adam moments, frozen parts), real values;
* ``full``: the stage-1 full-size state (SD1.5 sizes, ``configs/stage1.py``) is built abstractly
  (shapes only; it needs ~20 GB, more than this host has free), and its arrays are taken in tree
  order until ``--sample-mb`` MB, filled with random values and checkpointed. The full state's time is
  that sample's, scaled by bytes (reported as an extrapolation, with the sample's throughput).

Then ``--records``: a synthetic dataset (``--videos`` videos) written locally and to the bucket
(``data_pipelines.dataset.build_dataset``), and every record read in a random order through
``open_dataset`` (ArrayRecord's random access; from the bucket through its own GCS reader).

The emulator is a local process over HTTP, so its numbers show the overhead of the object-store
path (TensorStore's GCS driver, many objects, commit markers), not a real bucket's bandwidth or
latency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _hardware import cpu_name  # noqa: E402


def _nbytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tiny_state():
    from anim_jax import configlib
    from anim_jax.train.setup import setup

    cfg = configlib.load_config(os.path.join(os.path.dirname(HERE), "configs", "stage1.py") + ":tiny",
                                ["--config.mesh.num_devices=1"])
    return setup(cfg).state.checkpoint_items(True)


def full_sample(sample_mb: float):
    """(sample of the full stage-1 state as concrete arrays, the full state's bytes)."""
    import jax
    import numpy as np

    from anim_jax import configlib
    from anim_jax.train.setup import setup

    cfg = configlib.load_config(os.path.join(os.path.dirname(HERE), "configs", "stage1.py"),
                                ["--config.mesh.num_devices=1"])
    abstract = setup(cfg, abstract=True).state.checkpoint_items(bool(cfg.train.include_frozen))
    total = _nbytes(abstract)
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    rng, out, size = np.random.default_rng(0), {}, 0
    for path, leaf in flat:
        n = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if size + n > sample_mb * 2**20 and out:
            continue
        out[jax.tree_util.keystr(path)] = jax.device_put(rng.standard_normal(leaf.shape, np.float32).astype(leaf.dtype))
        size += n
        if size >= sample_mb * 2**20:
            break
    return out, total


def time_round_trip(tree, directory: str, repeats: int) -> dict:
    import jax

    from anim_jax.checkpoint import CheckpointManager

    saves, restores = [], []
    target = tree  # restore() reads onto abstract_like(target): shapes, dtypes, shardings
    with CheckpointManager(directory, max_to_keep=2, async_save=False) as cm:
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            cm.save(step, tree)
            cm.wait()
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = cm.restore(step, target, data_iterator=False)
            jax.block_until_ready(r.state)
            restores.append(time.perf_counter() - t0)
    return dict(save_s=statistics.median(saves), restore_s=statistics.median(restores))


def time_records(tmp: str, bucket: str, videos: int) -> list[dict]:
    import numpy as np

    from data_pipelines import dataset
    from data_pipelines.synthetic import write_synthetic_dataset

    local = os.path.join(tmp, "ds")
    write_synthetic_dataset(local, videos, num_frames=24, height=128, width=128)
    t0 = time.perf_counter()
    dataset.build_dataset(f"gs://{bucket}/ds", (dataset.open_dataset(local)[i] for i in range(videos)))
    upload_s = time.perf_counter() - t0
    rows = []
    for where, path in (("local disk", local), ("gs:// emulator", f"gs://{bucket}/ds")):
        t0 = time.perf_counter()
        src = dataset.open_dataset(path)
        open_s = time.perf_counter() - t0
        order = np.random.default_rng(0).permutation(len(src))
        t0 = time.perf_counter()
        nbytes = sum(sum(len(f) for f in src[int(i)]["frames"]) for i in order)
        read_s = time.perf_counter() - t0
        rows.append(dict(where=where, records=len(src), mb=nbytes / 2**20, open_s=open_s, read_s=read_s,
                         records_per_s=len(src) / read_s, **({"upload_s": upload_s} if "gs" in where else {})))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample-mb", type=float, default=256.0, help="bytes of the full state actually checkpointed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--videos", type=int, default=32, help="videos in the --records dataset (24 frames, 128x128)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    from gcs_emulator import BUCKET, running_emulator

    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
               "cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "jax": jax.__version__, "rows": []}
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-")
    try:
        with running_emulator(os.path.join(tmp, "fake-gcs-server.log")):
            trees = [("tiny", tiny_state(), None)]
            sample, total = full_sample(args.sample_mb)
            trees.append(("full", sample, total))
            for name, tree, full_bytes in trees:
                nbytes = _nbytes(tree)
                for where, directory in (("local disk", os.path.join(tmp, name)), ("gs:// emulator", f"gs://{BUCKET}/{name}")):
                    r = time_round_trip(tree, directory, args.repeats)
                    row = dict(state=name, where=where, arrays=len(jax.tree.leaves(tree)), mb=nbytes / 2**20, **r,
                               save_mb_s=nbytes / 2**20 / r["save_s"], restore_mb_s=nbytes / 2**20 / r["restore_s"])
                    if full_bytes:
                        scale = full_bytes / nbytes
                        row.update(full_mb=full_bytes / 2**20, full_save_s=r["save_s"] * scale,
                                   full_restore_s=r["restore_s"] * scale)
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
            results["records"] = time_records(tmp, BUCKET, args.videos)
            for row in results["records"]:
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{results['cpu']}, {results['cpus']} CPUs, load average {results['load_average']:.1f}, jax {results['jax']}")
    print("| state | where | arrays | MB | save s | restore s | save MB/s | restore MB/s | full state: MB, save s, restore s (scaled) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        full = f"{r['full_mb']:.0f}, {r['full_save_s']:.0f}, {r['full_restore_s']:.0f}" if "full_mb" in r else ""
        print(f"| {r['state']} | {r['where']} | {r['arrays']} | {r['mb']:.1f} | {r['save_s']:.2f} | {r['restore_s']:.2f} | "
              f"{r['save_mb_s']:.0f} | {r['restore_mb_s']:.0f} | {full} |")
    print("\n| dataset on | records | MB of frames | open s | all records, random order: s | records/s |")
    print("|---|---|---|---|---|---|")
    for r in results["records"]:
        print(f"| {r['where']} | {r['records']} | {r['mb']:.1f} | {r['open_s']:.2f} | {r['read_s']:.2f} | {r['records_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What XLA:CPU's compiler holds per distinct kernel while it compiles (benchmarks/RESULTS.md, "Issue 19,
CPU round 14").

    python benchmarks/compile_memory.py --fusions 50,200 --kinds add,tanh_exp

Each row compiles, in a fresh process, one program of N independent elementwise fusions, each on a
different shape so that XLA cannot share one kernel between them, and reports how far the process's
resident memory rose during the compile (sampled every 10 ms) and that rise per fusion, with XLA's
fusion emitters (its default) and with its older emitters (``xla_cpu_use_fusion_emitters=false``).
Kinds: ``add`` (x + 1) and ``tanh_exp`` (tanh(a x) + exp(-x)).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

KINDS = ("add", "tanh_exp")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(fusions: int, kind: str, fusion_emitters: bool) -> dict:
    import jax
    import jax.numpy as jnp

    def program(xs):
        if kind == "add":
            return [x + 1.0 for x in xs]
        return [jnp.tanh(x * (i + 1.5)) + jnp.exp(-x) for i, x in enumerate(xs)]

    xs = [jnp.ones((8, 16 + i, 32)) for i in range(fusions)]
    lowered = jax.jit(program).lower(xs)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    before = _rss_mib()
    sampler.start()
    t0 = time.perf_counter()
    lowered.compile(compiler_options={"xla_cpu_use_fusion_emitters": fusion_emitters})
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    rise = max(peak[0], _rss_mib()) - before
    return dict(fusions=fusions, kind=kind, fusion_emitters=fusion_emitters, rise_mib=round(rise),
                per_fusion_mib=round(rise / fusions, 2), compile_s=round(seconds, 1), jax=jax.__version__)


def _ints(text: str) -> list[int] | None:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        return None
    return values if all(v > 0 for v in values) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fusions", default="50,200", help="fusions per program, comma-separated (default 50,200)")
    ap.add_argument("--kinds", default="add,tanh_exp", help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--worker", nargs=3, metavar=("FUSIONS", "KIND", "EMITTERS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(int(a.worker[0]), a.worker[1], a.worker[2] == "new")))
        return 0
    counts = _ints(a.fusions)
    if counts is None:
        print(f"error: --fusions: expected comma-separated positive integers, got {a.fusions!r}", file=sys.stderr)
        return 2
    kinds = a.kinds.split(",")
    if bad := [k for k in kinds if k not in KINDS]:
        print(f"error: --kinds: {', '.join(bad)} not one of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    rows = []
    for kind in kinds:
        for n in counts:
            for emitters in ("new", "old"):
                p = subprocess.run([sys.executable, __file__, "--worker", str(n), kind, emitters],
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"error: worker {n} {kind} {emitters} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}",
                          file=sys.stderr)
                    return 1
                rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{kind:9s} {n:5d} fusions, {'fusion' if r['fusion_emitters'] else 'older'} emitters: "
                      f"+{r['rise_mib']} MiB ({r['per_fusion_mib']} MiB a fusion), compile {r['compile_s']} s", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

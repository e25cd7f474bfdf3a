"""Per-element closeness for every parity test: ``|ours - ref| <= atol + rtol * |ref|`` everywhere.

One helper so every module is held to the same kind of bound. A max-relative check
(``max|d| <= r * max|ref|``) lets errors in low-magnitude regions hide behind the largest value;
per element they cannot. Each test states its ``Tol``, set at about 10x the error the code
actually reaches (the margin). To re-measure, run the tests with ``ANIM_JAX_TOLERANCE_LOG=FILE``:
every comparison appends one line with its name, the largest ``|d|``, the largest ``|d| / |ref|``
over elements with ``|ref| >= rms(ref)``, and ``used``, the fraction of the stated bound it used
(about 0.1 by design; above 1 fails). The mutation test (test_mutations.py) checks that these
bounds catch small deliberate errors.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


def used(ours, ref, tol: Tol) -> float:
    """max over elements of |ours - ref| / (atol + rtol |ref|): <= 1 is close; NaN counts as inf."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise AssertionError(f"shape {ours.shape} != reference shape {ref.shape}")
    ratio = np.abs(ours - ref) / (tol.atol + tol.rtol * np.abs(ref))
    return float(np.inf) if np.isnan(ratio).any() else float(ratio.max(initial=0.0))


def assert_close(ours, ref, tol: Tol, what: str = "") -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    u = used(ours, ref, tol)
    _log(what, ours, ref, u)
    if u > 1:
        d = np.abs(ours - ref)
        i = np.unravel_index(np.nanargmax(d / (tol.atol + tol.rtol * np.abs(ref))), d.shape)
        raise AssertionError(
            f"{what or 'output'}: |ours - ref| <= {tol.atol:g} + {tol.rtol:g} |ref| fails by {u:.3g}x; "
            f"worst at {tuple(int(j) for j in i)}: ours {ours[i]:.7g}, ref {ref[i]:.7g}; max |d| {d.max():.3g}, "
            f"max |ref| {np.abs(ref).max():.3g}"
        )


def _log(what, ours, ref, u):
    path = os.environ.get("ANIM_JAX_TOLERANCE_LOG")
    if not path:
        return
    d = np.abs(ours - ref)
    big = np.abs(ref) >= np.sqrt(np.mean(ref**2))
    rel = float((d[big] / np.abs(ref[big])).max(initial=0.0))
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(path, "a") as f:
        f.write(f"{test} {what or '-'} max_abs={d.max(initial=0.0):.3g} max_rel={rel:.3g} "
                f"rms_ref={np.sqrt(np.mean(ref**2)):.3g} used={u:.3g}\n")

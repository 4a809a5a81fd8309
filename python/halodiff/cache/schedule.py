"""DeepCache step schedules: which denoising steps run the whole UNet ("full" steps).

Everything else is a partial step that runs only the shallow path on cached deep features
(docs/algorithms.md §4). The schedule is fixed before the first step, never decided from data.
"""
from __future__ import annotations

import numpy as np

SCHEDULES = ("uniform", "quadratic")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"deepcache: {name} must be an int >= {low}; got {value!r}")


def check_schedule_args(interval: int, schedule: str, center: int, power: float) -> None:
    """Validate the step-independent arguments (the step count is checked by `deepcache_schedule`)."""
    _check_int("interval", interval, 1)
    if schedule not in SCHEDULES:
        raise ValueError(f"deepcache: schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    _check_int("center", center, 0)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 1.0:
        raise ValueError(f"deepcache: power must be a number > 1 (the search lowers it by 0.02 down to 1); "
                         f"got {power!r}")


def _fit(num_steps: int, num_full: int, center: int, power: float) -> list[int] | None:
    p = float(power)
    while p > 1:
        # Python's float power: a negative base with a fractional exponent gives the principal complex root.
        x = np.linspace((-center) ** (1 / p), (num_steps - center) ** (1 / p), num_full + 1)
        values = np.unique(np.trunc(np.real(x**p)).astype(np.int64))
        indices = [0] + [int(v) + center for v in values[1:-1]]
        if len(indices) == num_full:
            return indices
        p -= 0.02
    return None


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> '1-3, 5, 7-8'."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def quadratic_schedule(num_steps: int, num_full: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform schedule (`sample_from_quad_center`): `num_full` indices denser around
    `center`. x = linspace((-c)^(1/p), (T-c)^(1/p), n+1) on the principal complex branch; indices are
    [0] + [c + v for v in unique(trunc(real(x^p)))[1:-1]]. p starts at `power` and drops by 0.02
    until exactly n indices come out (error once p <= 1). Same float operations as the original."""
    if not 0 <= center < num_steps:
        raise ValueError(f"deepcache: quadratic schedule center must be in [0, {num_steps - 1}] for "
                         f"{num_steps} steps; got center={center}")
    indices = _fit(num_steps, num_full, center, power)
    if indices is not None:
        return indices
    fits = [i for i in range(2, num_steps + 1) if _fit(num_steps, len(range(0, num_steps, i)), center, power)]
    raise ValueError(
        f"deepcache: the quadratic schedule cannot place {num_full} full steps among {num_steps} steps around "
        f"center={center} for any power in (1, {power}]; intervals that fit here: {_ranges(fits) or 'none'} "
        f"(or 1 = every step), or choose another center in [0, {num_steps - 1}]"
    )


def deepcache_schedule(num_steps: int, interval: int, schedule: str = "uniform", center: int = 15,
                       power: float = 1.4) -> list[int]:
    """Indices (0-based, sorted) of the full steps among `num_steps` denoising steps.

    uniform: every `interval`-th step (0, interval, 2*interval, ...).
    quadratic: the same number of full steps, ceil(num_steps / interval) (= num_steps // interval when
        it divides), placed by DeepCache's non-uniform schedule around `center` (see `quadratic_schedule`).
    interval 1 makes every step full for both schedules (as DeepCache's pipeline does).
    """
    _check_int("num_steps", num_steps, 1)
    check_schedule_args(interval, schedule, center, power)
    uniform = list(range(0, num_steps, interval))
    if interval == 1 or schedule == "uniform":
        return uniform
    return quadratic_schedule(num_steps, len(uniform), center, power)

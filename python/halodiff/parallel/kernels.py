"""The ops of the engine's hot path, bound to a backend once (`halodiff.ops.registry.Binding`).

Every band layer of every step calls these; the public `halodiff.ops` functions would re-validate the
arguments and re-select the backend on each call. The engine's arguments are correct by construction, so
the backend is chosen on the first call per (device, dtype, shape class) and then called directly."""
from __future__ import annotations

import torch

from .. import ops as _ops  # noqa: F401  (registers every op and backend)
from ..ops.registry import Binding


class EngineOps:
    def __init__(self) -> None:
        self._bind = Binding()

    def group_stats(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        return self._bind("group_stats", x.device, (x.device, x.dtype), x, groups)

    def group_norm(self, x, groups, weight, bias, eps, silu, stats, count) -> torch.Tensor:
        return self._bind("group_norm", x.device, (x.device, x.dtype), x, groups, weight, bias, float(eps),
                          bool(silu), stats, float(count))

    def group_norm_stale(self, x, groups, weight, bias, eps, silu, stale_global, stale_local, count):
        return self._bind("group_norm_stale", x.device, (x.device, x.dtype), x, groups, weight, bias, float(eps),
                          bool(silu), stale_global, stale_local, float(count))

    def segmented_attention(self, q, ks, vs, scale) -> torch.Tensor:
        key = (q.device, q.dtype, q.shape[-1], len(ks))
        return self._bind("segmented_attention", q.device, key, q, list(ks), list(vs), scale)

"""Argument checks shared by every backend: clear ValueError/TypeError naming the argument and the fix."""
from __future__ import annotations

import numbers

import torch


def tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def group_input(x: object, num_groups: object) -> tuple[torch.Tensor, int]:
    x = tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}; reshape it to 4-D first")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must be positive and divide the channel count C={x.shape[1]}"
        )
    return x, num_groups


def affine(p: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if p is None:
        return
    tensor(p, name)
    if p.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape [C] = [{x.shape[1]}], got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}; move it with .to(x.device)")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {p.dtype}")


def sums(s: object, name: str, x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """A float64 [B, G, 2] tensor of per-group sums (what group_stats returns) on x's device."""
    s = tensor(s, name)
    if s.shape != (x.shape[0], num_groups, 2):
        raise ValueError(
            f"{name} must have shape [B, G, 2] = [{x.shape[0]}, {num_groups}, 2] (a group_stats result), "
            f"got {tuple(s.shape)}"
        )
    if s.dtype != torch.float64:
        raise TypeError(f"{name} must be float64 (group_stats returns float64 sums); got {s.dtype}: "
                        f"pass {name}.double()")
    if s.device != x.device:
        raise ValueError(f"{name} is on {s.device} but x is on {x.device}; move it with .to(x.device)")
    return s


def count(value: object, what: str) -> float:
    """The element count per group that the sums cover: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < float("inf")):
        raise ValueError(f"count (elements per group that {what} cover) must be a number > 0, got {value!r}")
    return float(value)


def stats(s: torch.Tensor | None, n: float | None, x: torch.Tensor, num_groups: int) -> float | None:
    """Checks group_norm's (stats, count) pair; returns count as a float (None without stats)."""
    if s is None:
        if n is not None:
            raise ValueError("count is only used with stats=...; pass both or neither")
        return None
    sums(s, "stats", x, num_groups)
    if n is None:
        raise ValueError("count (elements per group that stats cover) must be given with stats=...")
    return count(n, "stats")


def eps(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) >= 0:
        raise ValueError(f"eps must be a number >= 0, got {value!r}")
    return float(value)

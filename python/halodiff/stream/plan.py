"""Per-slot constants of a prepared stream and the UNet-row plan of a range of slots.

Slot i denoises at ``t_i = timesteps[t_index_list[i]]`` of the LCM schedule with ``alpha_i = sqrt(abar(t_i))``,
``beta_i = sqrt(1 - abar(t_i))`` and the LCM boundary scalings ``(c_skip_i, c_out_i)`` (computed exactly as the
package computes them). A :class:`SlotPlan` lays a contiguous range of slots out as UNet rows, F rows per slot:
batch mode runs one plan over all of a rank's slots, sequential mode one plan per slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import Conditioning


@dataclass(frozen=True)
class SlotSchedule:
    """``[n]`` tensors: timesteps (long) and alpha, beta, c_skip, c_out (stream dtype)."""

    timesteps: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor

    @classmethod
    def build(cls, scheduler, t_index_list: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> SlotSchedule:
        timesteps = scheduler.timesteps.cpu()  # alphas_cumprod lives on the CPU
        sub = [timesteps[i] for i in t_index_list]
        scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in sub]
        abar = [scheduler.alphas_cumprod[t] for t in sub]

        def stack(values) -> torch.Tensor:
            return torch.stack([torch.as_tensor(v) for v in values]).to(device=device, dtype=dtype)

        return cls(
            timesteps=torch.tensor([int(t) for t in sub], dtype=torch.long, device=device),
            alpha=stack([a.sqrt() for a in abar]), beta=stack([(1 - a).sqrt() for a in abar]),
            c_skip=stack([s[0] for s in scalings]), c_out=stack([s[1] for s in scalings]))


def _rows(values: torch.Tensor, frames: int) -> torch.Tensor:
    return values.repeat_interleave(frames).view(-1, 1, 1, 1)


@dataclass
class SlotPlan:
    """UNet rows of slots ``[a, b)``: ``F`` rows per slot, plus uncond rows for ``extra``.

    extra: "full" (every row again, uncond first) or "initialize" (slot 0's rows once more, uncond, first).
    The ``*_next`` rows cover the slots that hand their latent on (all but the stream's last slot).
    """

    a: int
    b: int
    frames: int
    extra: str | None
    t: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    alpha_next: torch.Tensor
    beta_next: torch.Tensor
    noise_next: torch.Tensor
    alpha_in: torch.Tensor
    beta_in: torch.Tensor
    emb: torch.Tensor | None = None
    added: dict[str, torch.Tensor] | None = None

    @classmethod
    def build(cls, s: SlotSchedule, a: int, b: int, frames: int, uncond_rows: str | None,
              init_noise: torch.Tensor) -> SlotPlan:
        n = len(s.timesteps)
        extra = uncond_rows if uncond_rows == "full" or (uncond_rows == "initialize" and a == 0) else None
        nxt = slice(a + 1, min(b, n - 1) + 1)
        alpha, beta = _rows(s.alpha[a:b], frames), _rows(s.beta[a:b], frames)
        plan = cls(a, b, frames, extra, t=s.timesteps[a:b].repeat_interleave(frames), alpha=alpha, beta=beta,
                   c_skip=_rows(s.c_skip[a:b], frames), c_out=_rows(s.c_out[a:b], frames),
                   alpha_next=_rows(s.alpha[nxt], frames), beta_next=_rows(s.beta[nxt], frames),
                   noise_next=init_noise[nxt.start * frames: nxt.stop * frames], alpha_in=alpha, beta_in=beta)
        plan.t, plan.alpha_in, plan.beta_in = (plan.expand(v) for v in (plan.t, alpha, beta))
        return plan

    @property
    def rows(self) -> int:
        """Base rows (without the uncond ones)."""
        return (self.b - self.a) * self.frames

    @property
    def next_rows(self) -> int:
        return len(self.noise_next)

    @property
    def uncond(self) -> int:
        return {"full": self.rows, "initialize": self.frames}.get(self.extra, 0)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Base rows -> UNet rows (uncond rows first)."""
        if self.extra == "full":
            return torch.cat([x, x])
        if self.extra == "initialize":
            return torch.cat([x[: self.frames], x])
        return x

    def condition(self, cond: Conditioning) -> None:
        self.emb, self.added = cond.rows(self.uncond, self.rows)

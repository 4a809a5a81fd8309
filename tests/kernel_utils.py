"""Helpers for the kernel tests: record the aten ops a launcher runs, reach the Triton kernel modules."""
from __future__ import annotations

import importlib

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    """Records the name (without overload) of every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def triton_module(name: str):
    """halodiff.triton_kernels.<name> (the package attribute of that name is the launcher function)."""
    return importlib.import_module(f"halodiff.triton_kernels.{name}")


def joint_attention_inputs(B, H, D, text, bands, rank, *, text_first, halo=None, device="cpu", dtype=None):
    """One rank's joint (text + image) attention in a patch-parallel DiT step: (q, ks, vs).

    `bands`: every rank's image band in tokens (rows x cols), `rank`: this rank's band. The rank's joint
    projection holds text + own band, text first (Flux, Qwen-Image) or last (SD3), as one [B, L, H, D] buffer
    viewed as [B, H, L, D]: q is all of it, and the text and own-band K/V segments are row slices of it.
    Key segments: [text, band 0, ..., own band, ..., band N-1] (DistriFusion, `halo=None`: the other bands are
    separate [B, L, H, D] buffers, as exchanged), or with `halo=(above, below)` tokens (PCPP) [text, the last
    `above` tokens of the band above, own band, the first `below` tokens of the band below]: partial rows
    allowed, 0 at an image edge gives an empty segment.
    """
    import torch

    dtype = dtype or torch.float32

    def proj(n):  # a transposed view of a [B, n, H*D] projection
        return torch.randn(B, n, H, D, device=device).to(dtype).transpose(1, 2)

    def joint(n_band):
        full = proj(text + n_band)
        txt, own = (full[:, :, :text], full[:, :, text:]) if text_first else (full[:, :, n_band:], full[:, :, :n_band])
        return full, txt, own

    q, _, _ = joint(bands[rank])
    _, k_txt, k_own = joint(bands[rank])
    _, v_txt, v_own = joint(bands[rank])
    if halo is None:
        others = [(proj(n), proj(n)) for n in bands]
        ks = [k_txt] + [k_own if i == rank else others[i][0] for i in range(len(bands))]
        vs = [v_txt] + [v_own if i == rank else others[i][1] for i in range(len(bands))]
        return q, ks, vs
    above, below = halo
    assert (rank > 0 or above == 0) and (rank < len(bands) - 1 or below == 0), "no neighbour band at an edge"
    k_up, v_up = proj(bands[rank - 1] if rank else 0), proj(bands[rank - 1] if rank else 0)
    k_dn = proj(bands[rank + 1] if rank + 1 < len(bands) else 0)
    v_dn = proj(bands[rank + 1] if rank + 1 < len(bands) else 0)
    n_up = k_up.shape[2]
    ks = [k_txt, k_up[:, :, n_up - above :], k_own, k_dn[:, :, :below]]
    vs = [v_txt, v_up[:, :, n_up - above :], v_own, v_dn[:, :, :below]]
    return q, ks, vs

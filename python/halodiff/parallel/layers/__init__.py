"""Layer mechanisms, one module per layer kind, and the registry the engine installs them from by role.

    halo_conv.py   k x k convs: halo rows from the neighbour bands (fresh / stale)
    group_norm.py  GroupNorm: the image's sums (fresh all-reduce / DistriFusion's corrected stale estimate)
    attention.py   self and joint attention: other bands' K/V (fresh / stale all-gather / PCPP partial rows)
    tokens.py      DiTs: the token split after the patch embedding and the gather before the unpatchify

`layout` lays out the static exchange slots of every traced layer (call order) for one input signature.
"""
from __future__ import annotations

from ...comm.manager import RowSpec, SumSpec
from . import attention, group_norm, halo_conv, tokens

INSTALLERS = {
    "halo_conv": halo_conv.install,
    "group_norm": group_norm.install,
    "self_attention": attention.install,
    "joint_attention": attention.install,
    "cross_attention": attention.install,
}


def layout(st, step, strategy) -> tuple[list[RowSpec], list[SumSpec]]:
    """Static exchange slots of every band layer of the traced model, in call order."""
    rows, sums = [], []
    for key, info in st.layers.items():
        if info.kind == halo_conv.KIND:
            rows.append(halo_conv.slots(key, info, step.bands, step.topo))
        elif info.kind == group_norm.KIND:
            sums.append(SumSpec(key, (info.in_shape[0], info.params[0], 2)))
        elif info.kind == attention.KIND and strategy.partial_attention:
            rows.append(attention.slots(key, info, step, strategy.p))
    return rows, sums


__all__ = ["INSTALLERS", "attention", "group_norm", "halo_conv", "layout", "tokens"]

"""Triton kernels for halodiff (installed as `halodiff.triton_kernels`).

Each op is a `torch.library.triton_op` (namespace `halodiff_triton`) so it stays a single node under
torch.compile. On CPU tensors the kernels run only under TRITON_INTERPRET=1 (set before importing triton).
Every kernel module exposes `audit_configs()`: the (kernel, signature, constexprs, launch options) it
launches at the SD/SDXL configurations, for the ahead-of-time compile audit (halodiff.audit).
"""
from .group_norm import group_norm, group_norm_stale, group_stats
from .segmented_attention import segmented_attention

__all__ = ["group_norm", "group_norm_stale", "group_stats", "segmented_attention"]

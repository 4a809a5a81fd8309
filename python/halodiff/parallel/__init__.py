"""Patch parallelism (DistriFusion) and partial conditioning (PCPP) for diffusers UNets."""
from .patcher import comm_stats, context, patch, unpatch

__all__ = ["comm_stats", "context", "patch", "unpatch"]

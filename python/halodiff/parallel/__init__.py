"""Patch parallelism (DistriFusion) and partial conditioning (PCPP) for diffusers UNets."""
from .patcher import comm_stats, context, patch, simulate, unpatch

__all__ = ["comm_stats", "context", "patch", "simulate", "unpatch"]

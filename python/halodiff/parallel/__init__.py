"""Patch parallelism: the engine (engine.py), the exact exchange (exchange.py), DistriFusion (distrifusion.py)
and PCPP (pcpp.py) strategies, band geometry and the band layers."""
from .engine import comm_stats, context, patch, simulate, unpatch

__all__ = ["comm_stats", "context", "patch", "simulate", "unpatch"]

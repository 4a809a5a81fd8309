"""Patch parallelism: the engine (engine.py), the strategies (sync.py, distrifusion.py, pcpp.py: policy only),
the layer mechanisms (layers/: one module per layer kind), band geometry and the step state."""
from .engine import comm_stats, context, patch, simulate, unpatch

__all__ = ["comm_stats", "context", "patch", "simulate", "unpatch"]

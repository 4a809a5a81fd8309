"""All of halodiff's communication: patch-group topology, the comm manager, its byte counter, simulated links."""
from .manager import CommManager
from .simulated import SimulatedComm
from .stats import KINDS, CommStats
from .topology import Topology

__all__ = ["KINDS", "CommManager", "CommStats", "SimulatedComm", "Topology"]

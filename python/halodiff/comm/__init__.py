"""All of halodiff's communication: process-group topology, the comm manager and its byte counter."""
from .comm import KINDS, CommManager, CommStats, SimulatedComm, Topology

__all__ = ["KINDS", "CommManager", "CommStats", "SimulatedComm", "Topology"]

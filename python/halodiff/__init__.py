"""halodiff: faster diffusers UNet pipelines without retraining.

Patch parallelism (DistriFusion), partial conditioning (PCPP) and cached-feature skip blocks
(DeepCache), built on fused CUDA/Triton kernels. See README.md.
"""
from __future__ import annotations

from . import ops
from .cache import deepcache_schedule, disable_deepcache, enable_deepcache
from .config import ParallelConfig
from .comm import CommStats
from .errors import BackendUnavailableError, CommTimeoutError, HalodiffError, PatchError
from .parallel import comm_stats, patch, unpatch
from .stream import StreamDiffusion

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CommStats",
    "ParallelConfig",
    "comm_stats",
    "deepcache_schedule",
    "disable_deepcache",
    "enable_deepcache",
    "patch",
    "unpatch",
    "CommTimeoutError",
    "HalodiffError",
    "PatchError",
    "StreamDiffusion",
    "__version__",
    "ops",
]

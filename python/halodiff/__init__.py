"""halodiff: faster diffusers pipelines (UNets and DiTs) without retraining.

Patch parallelism (DistriFusion), partial conditioning (PCPP), caches (DeepCache, first-block cache) and
StreamDiffusion, built on fused CUDA/Triton kernels. See README.md.
"""
from __future__ import annotations

from . import ops
from .cache import (DeepCacheConfig, FirstBlockCacheConfig, deepcache_schedule, disable_cache, disable_deepcache,
                    enable_cache, enable_deepcache)
from .comm import CommStats
from .config import ParallelConfig
from .errors import BackendUnavailableError, CommTimeoutError, HalodiffError, MissingDependencyError, PatchError
from .parallel import comm_stats, patch, unpatch
from .runtime import new_generation
from .stream import StreamDiffusion

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CommStats",
    "DeepCacheConfig",
    "FirstBlockCacheConfig",
    "ParallelConfig",
    "comm_stats",
    "deepcache_schedule",
    "disable_cache",
    "disable_deepcache",
    "enable_cache",
    "enable_deepcache",
    "new_generation",
    "patch",
    "unpatch",
    "CommTimeoutError",
    "HalodiffError",
    "MissingDependencyError",
    "PatchError",
    "StreamDiffusion",
    "__version__",
    "ops",
]

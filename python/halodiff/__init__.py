"""halodiff: faster diffusers UNet pipelines without retraining.

Patch parallelism (DistriFusion), partial conditioning (PCPP) and cached-feature skip blocks
(DeepCache), built on fused CUDA/Triton kernels. See README.md.
"""
from __future__ import annotations

from . import ops
from .cache import DeepCacheConfig, deepcache_schedule, disable_deepcache, enable_deepcache
from .comm import CommStats
from .config import ParallelConfig
from .errors import BackendUnavailableError, CommTimeoutError, HalodiffError, PatchError
from .parallel import comm_stats, patch, unpatch
from .runtime import new_generation
from .stream import StreamDiffusion

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CommStats",
    "DeepCacheConfig",
    "ParallelConfig",
    "comm_stats",
    "deepcache_schedule",
    "disable_deepcache",
    "enable_deepcache",
    "new_generation",
    "patch",
    "unpatch",
    "CommTimeoutError",
    "HalodiffError",
    "PatchError",
    "StreamDiffusion",
    "__version__",
    "ops",
]

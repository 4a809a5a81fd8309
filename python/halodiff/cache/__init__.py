"""Caches behind one interface (`enable_cache` / `disable_cache`, base.py), one module per method:
DeepCache (deepcache.py; UNets, with its step schedules in schedule.py) and the first-block cache
(first_block.py; transformers)."""
from .base import CacheConfig, CacheRun, cache_run, disable_cache, enable_cache, methods
from .deepcache import (BranchPlan, DeepCacheConfig, DeepCacheRun, branch_plan, deepcache_context, disable_deepcache,
                        enable_deepcache)
from .first_block import FirstBlockCacheConfig, FirstBlockCacheRun, first_block_context
from .schedule import SCHEDULES, deepcache_schedule, quadratic_schedule

__all__ = ["SCHEDULES", "BranchPlan", "CacheConfig", "CacheRun", "DeepCacheConfig", "DeepCacheRun",
           "FirstBlockCacheConfig", "FirstBlockCacheRun", "branch_plan", "cache_run", "deepcache_context",
           "deepcache_schedule", "disable_cache", "disable_deepcache", "enable_cache", "enable_deepcache",
           "first_block_context", "methods", "quadratic_schedule"]

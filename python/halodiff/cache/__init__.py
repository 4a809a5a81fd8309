"""Cached-feature skip blocks (DeepCache) and their step schedules."""
from .deepcache import (BranchPlan, DeepCacheConfig, DeepCacheRun, branch_plan, deepcache_context, disable_deepcache,
                        enable_deepcache)
from .schedule import SCHEDULES, deepcache_schedule, quadratic_schedule

__all__ = ["SCHEDULES", "BranchPlan", "DeepCacheConfig", "DeepCacheRun", "branch_plan", "deepcache_context",
           "deepcache_schedule", "disable_deepcache", "enable_deepcache", "quadratic_schedule"]

"""The engine's host path: host syncs, dispatcher ops and host time per UNet call (patched vs unpatched).

Counts come from a `TorchDispatchMode` around one steady-state UNet call (after warm-up), so they are what a
GPU would be asked to do, independent of this CPU's speed:
- host syncs: reads of tensor values on the host (`item`/`float`/`bool`/...: aten._local_scalar_dense,
  aten.is_nonzero; a device sync each on a GPU) and device-to-host copies;
- dispatcher ops: every aten/custom op dispatched (views included) and the non-view ones.
The structure of SD1.5 (block types, layers, attention) with narrow widths keeps the compute small; op counts
depend on the structure, not the widths. Host time: median wall time per UNet call at a 16x16 latent with
compute negligible (narrow widths), one simulated rank of 2, interleaved with the unpatched model.

    python bench/host_path.py --json bench_out/host_path.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import halodiff
from halodiff.models.sd_configs import unet_config

SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item"}


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops, the view ops among them and host syncs."""

    def __init__(self):
        super().__init__()
        self.ops = self.views = self.syncs = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.__name__.split(".")[0]
        self.names[name] = self.names.get(name, 0) + 1
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            self.views += 1
        if name in SYNC_OPS:
            self.syncs += 1
        if name in ("_to_copy", "copy_", "to") and any(
                isinstance(a, torch.Tensor) and a.device.type not in ("cpu", "meta") for a in args) and \
                kwargs.get("device", None) is not None and torch.device(kwargs["device"]).type == "cpu":
            self.syncs += 1
        return func(*args, **kwargs)


def narrow_sd15(width: int):
    from diffusers import UNet2DConditionModel

    cfg = unet_config("sd15")
    cfg.update(block_out_channels=(width, 2 * width, 4 * width, 4 * width), cross_attention_dim=64,
               norm_num_groups=min(32, width))
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval()


def _inputs(latent: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, latent, latent, generator=g), torch.randn(2, 77, 64, generator=g)


def count_call(unet, sample, text, t) -> OpCounter:
    with torch.no_grad(), OpCounter() as c:
        unet(sample, t, encoder_hidden_states=text)
    return c


def op_counts(width: int, latent: int) -> list[dict]:
    """Ops of one steady-state UNet call: unpatched, DeepCache partial/full, and one simulated rank of 2 in
    each patch mode (band 0; a pipeline's scheduler drives the clock)."""
    from diffusers import DDIMScheduler

    unet = narrow_sd15(width)
    sample, text = _inputs(latent)
    sched = DDIMScheduler(num_train_timesteps=1000)
    rows = []

    def run(label, setup, teardown, calls=6):
        setup()
        sched.set_timesteps(calls)
        counters = []
        for t in sched.timesteps:
            counters.append(count_call(unet, sample, text, t))
        teardown()
        return counters

    base = run("unpatched", lambda: None, lambda: None)[-2]
    rows.append(dict(case="unpatched", ops=base.ops, non_view=base.ops - base.views, syncs=base.syncs))
    dc = run("deepcache", lambda: halodiff.enable_deepcache(unet, interval=3, scheduler=sched),
             lambda: halodiff.disable_deepcache(unet))
    for kind, c in (("deepcache partial step", dc[4]), ("deepcache full step", dc[3])):
        rows.append(dict(case=kind, ops=c.ops, non_view=c.ops - c.views, syncs=c.syncs))
    for mode in ("sync", "distrifusion", "pcpp"):
        cfg = halodiff.ParallelConfig(mode=mode, warmup_steps=1, split_cfg=False)
        counters = run(mode, lambda: halodiff.parallel.simulate(unet, cfg, 2, 0, scheduler=sched),
                       lambda: halodiff.unpatch(unet))
        c = counters[-2]  # a steady step (async for the stale modes), not the last
        rows.append(dict(case=f"{mode}, 1 simulated rank of 2", ops=c.ops, non_view=c.ops - c.views, syncs=c.syncs,
                         top_ops=sorted(c.names.items(), key=lambda kv: -kv[1])[:8]))
    for r in rows:
        r["ops_ratio"] = r["ops"] / base.ops
        r["non_view_ratio"] = r["non_view"] / (base.ops - base.views)
    return rows


def host_time(width: int, latent: int, repeats: int, calls: int) -> list[dict]:
    """Median wall time of a UNet call (compute negligible): unpatched vs one simulated rank of 2 (async)."""
    from diffusers import DDIMScheduler

    unet = narrow_sd15(width)
    sample, text = _inputs(latent)
    sched = DDIMScheduler(num_train_timesteps=1000)
    times: dict[str, list[float]] = {"unpatched": [], "distrifusion, 1 simulated rank of 2": []}
    for _ in range(repeats):
        for label in times:
            patched = label != "unpatched"
            if patched:
                halodiff.parallel.simulate(unet, halodiff.ParallelConfig(mode="distrifusion", warmup_steps=1,
                                                                         split_cfg=False), 2, 0, scheduler=sched)
            sched.set_timesteps(calls + 2)
            with torch.no_grad():
                for i, t in enumerate(sched.timesteps[:-1]):
                    t0 = time.perf_counter()
                    unet(sample, t, encoder_hidden_states=text)
                    if i >= 2:
                        times[label].append(time.perf_counter() - t0)
            if patched:
                halodiff.unpatch(unet)
    base = statistics.median(times["unpatched"])
    return [dict(case=k, ms_per_call=statistics.median(v) * 1e3, ratio=statistics.median(v) / base)
            for k, v in times.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32, help="base width of the SD1.5-structure UNet (320 = SD1.5)")
    p.add_argument("--count-latent", type=int, default=32)
    p.add_argument("--time-latent", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)
    counts = op_counts(a.width, a.count_latent)
    times = host_time(a.width, a.time_latent, a.repeats, a.calls)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread"
    print(f"machine: {machine}; SD1.5 structure, width {a.width}")
    print("| UNet call | dispatcher ops | vs unpatched | non-view ops | vs unpatched | host syncs |")
    print("|---|---|---|---|---|---|")
    for r in counts:
        print(f"| {r['case']} | {r['ops']} | {r['ops_ratio']:.2f}x | {r['non_view']} | {r['non_view_ratio']:.2f}x | "
              f"{r['syncs']} |")
    print(f"\nhost time per UNet call, {a.time_latent}x{a.time_latent} latent (compute negligible):")
    for r in times:
        print(f"  {r['case']}: {r['ms_per_call']:.2f} ms ({r['ratio']:.2f}x)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(machine=machine, width=a.width, counts=counts, host_time=times), indent=2))


if __name__ == "__main__":
    main()

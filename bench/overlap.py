"""How much communication does an async (DistriFusion) step expose? One simulated rank behind a simulated link.

`halodiff.parallel.simulate` makes this process play band 0 of a 2-rank group; its messages go over a
`SimulatedLink`: each occupies one serial link for latency + bytes / bandwidth and a wait blocks until it
would have arrived, while the compute goes on. The bandwidth is chosen so that one async step's messages
keep the link busy for as long as the step computes (comm ≈ compute). Steady async steps are timed, the
schedules interleaved, medians reported:

    compute only              SimulatedComm (messages complete at once)
    checkpointed              comm_checkpoint = K: boundary data posted every K band layers during the forward and
                              waited for where the next step reads it (the default, eager)
    checkpointed, joined      the same, but every step joins its messages before it returns (CUDA-graph mode)
    post at end, joined       comm_checkpoint = 0 and joined: halos and sums posted when the forward ends, as the
                              previous engine did (on NCCL its output gather queued behind them)

exposed fraction = (step − compute) / link busy time. Goals: checkpointed ≤ 1.15x compute, post at end ≈ 2x.

    python bench/overlap.py --json bench_out/overlap.json
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


def _unet(width: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width), norm_num_groups=16, cross_attention_dim=64,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def _time_steps(unet, sample, text, transport, checkpoint: int, steps: int) -> tuple[list[float], dict]:
    """Patch as one simulated rank of 2, one warm-up step, then `steps` timed async steps."""
    import halodiff

    cfg = halodiff.ParallelConfig(mode="distrifusion", warmup_steps=1, comm_checkpoint=checkpoint, split_cfg=False)
    halodiff.parallel.simulate(unet, cfg, 2, 0, transport=transport)
    comm = halodiff.parallel.context(unet).models["unet"].comm
    stats = halodiff.comm_stats(unet)
    times = []
    with torch.no_grad():
        for i, t in enumerate(range(999, 999 - 10 * (steps + 2), -10)):
            if i == 2:
                stats.reset()
                busy0 = getattr(comm, "busy_s", 0.0)
            t0 = time.perf_counter()
            unet(sample, t, encoder_hidden_states=text)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    info = dict(bytes_per_step=stats.bytes_received / steps, messages_per_step=stats.messages / steps,
                wait_s_per_step=stats.wait_s / steps, link_busy_s_per_step=(getattr(comm, "busy_s", 0.0) - busy0) / steps)
    halodiff.unpatch(unet)
    return times, info


def main() -> None:
    from halodiff.comm import SimulatedComm
    from halodiff.comm.simulated import SimulatedLink

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64, help="UNet base width (SD1.5 structure; 320 = SD1.5)")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed async steps per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every schedule")
    p.add_argument("--checkpoint", type=int, default=8)
    p.add_argument("--latency-us", type=float, default=20.0)
    p.add_argument("--comm-ratio", type=float, default=1.0, help="link busy time per step / compute time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    unet = _unet(a.width)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, a.latent, a.latent, generator=g)
    text = torch.randn(2, 8, 64, generator=g)

    # compute-only step time, and the link time of one step at 1 GB/s, to pick the bandwidth
    compute, info0 = _time_steps(unet, sample, text, SimulatedComm, a.checkpoint, a.steps)
    probe = lambda stats, k: SimulatedLink(stats, k, 2, 1e9, a.latency_us * 1e-6)  # noqa: E731  (1 GB/s)
    _, probe_info = _time_steps(unet, sample, text, probe, a.checkpoint, 1)
    t_compute = statistics.median(compute)
    n_msgs = probe_info["messages_per_step"]
    byte_time_at_1gbs = probe_info["link_busy_s_per_step"] - n_msgs * a.latency_us * 1e-6
    bandwidth = 1e9 * byte_time_at_1gbs / max(a.comm_ratio * t_compute - n_msgs * a.latency_us * 1e-6, 1e-6)

    def link(join: bool):
        def make(stats, k):
            comm = SimulatedLink(stats, k, 2, bandwidth, a.latency_us * 1e-6)
            comm.join_at_end = join
            return comm
        return make

    schedules = {
        "compute only": (SimulatedComm, a.checkpoint),
        f"checkpointed (every {a.checkpoint} layers)": (link(False), a.checkpoint),
        f"checkpointed (every {a.checkpoint} layers), joined": (link(True), a.checkpoint),
        "post at end, joined": (link(True), 0),
    }
    times: dict[str, list[float]] = {name: [] for name in schedules}
    infos: dict[str, dict] = {}
    for _ in range(a.repeats):
        for name, (transport, k) in schedules.items():
            t, infos[name] = _time_steps(unet, sample, text, transport, k, a.steps)
            times[name] += t
    base = statistics.median(times["compute only"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        busy = infos[name]["link_busy_s_per_step"]
        rows.append(dict(schedule=name, step_s=med, ratio_vs_compute=med / base, link_busy_s=busy,
                         exposed_fraction=(med - base) / busy if busy else 0.0,
                         wait_s=infos[name]["wait_s_per_step"], mb_per_step=infos[name]["bytes_per_step"] / 1e6,
                         messages_per_step=infos[name]["messages_per_step"]))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.threads} thread(s)"
    print(f"machine: {machine}; UNet width {a.width}, latent {a.latent}, link {bandwidth / 1e9:.3f} GB/s + "
          f"{a.latency_us:g} us/message (comm/compute = {a.comm_ratio:g})")
    print("| schedule | s / async step | vs compute only | link busy s | exposed fraction | MB / step | messages |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['step_s']:.3f} | {r['ratio_vs_compute']:.2f}x | {r['link_busy_s']:.3f} | "
              f"{r['exposed_fraction']:.2f} | {r['mb_per_step']:.1f} | {r['messages_per_step']:.0f} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(machine=machine, width=a.width, latent=a.latent, bandwidth_Bps=bandwidth,
                                          latency_us=a.latency_us, rows=rows), indent=2))


if __name__ == "__main__":
    main()

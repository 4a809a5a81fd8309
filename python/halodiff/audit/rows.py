"""One audit row per kernel x arch x dtype x head dim (or shape label), and its analysis."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .sass import ARCH, Instr, bound, counts, hot_loop

# The head dims of the models halodiff serves (UNets, and DiTs' joint text + image attention).
SD_HEAD_DIMS = {40: "SD1.5 level 0", 64: "SD2.x/SDXL, SD3/PixArt", 80: "SD1.5 level 1", 128: "Flux/Qwen-Image",
                160: "SD1.5 levels 2-3"}


@dataclass
class Row:
    backend: str
    kernel: str
    arch: str
    dtype: str
    head_dim: str
    variant: str
    function: str
    threads: int | None
    regs: int
    local_bytes: int
    spill_bytes: int | None
    smem_bytes: int | None
    smem_source: str
    sd_config: str = ""
    occupancy: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    loop: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    @property
    def shared_loads_per_mma(self) -> float | None:
        mma = self.loop.get("hmma", 0) + self.loop.get("wgmma", 0)
        return round((self.loop.get("lds", 0) + self.loop.get("ldsm", 0)) / mma, 3) if mma else None

    def flat(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("occupancy", "total", "loop", "model")}
        d.update(self.occupancy)
        d.update({f"fn_{k}": v for k, v in self.total.items()})
        d.update({f"loop_{k}": v for k, v in self.loop.items()})
        d["loop_shared_loads_per_mma"] = self.shared_loads_per_mma
        d.update(self.model)
        return d


def analyse(name: str, instrs: list[Instr], arch: int) -> tuple[dict, dict, dict]:
    total = counts(instrs)
    region = hot_loop(instrs)
    loop = counts(instrs[region[0] : region[1] + 1]) if region else {}
    model = bound(loop, ARCH[arch]) if loop else {"bound": "no loop"}
    return total, loop, model



def sd_label(head_dim: str) -> str:
    """Which model head dims (SD UNets, DiTs) a (padded) head dim serves."""
    if not head_dim.isdigit():
        return ""
    dp = int(head_dim)
    pad = lambda d: (d + 15) // 16 * 16 if d <= 128 else (d + 31) // 32 * 32  # noqa: E731
    return "; ".join(f"D={d} {what}" for d, what in SD_HEAD_DIMS.items() if pad(d) == dp or d == dp)


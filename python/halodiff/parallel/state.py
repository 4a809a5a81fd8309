"""Explicit state of a patched pipeline: topology (patch group, CFG split), per-denoiser geometry measured by a
meta-device trace, and the step that is running. No globals: each patch owns one `ParallelContext`.

A denoiser has one `ModelState` per named call of a step (diffusers' `cache_context`: "cond" / "uncond" when a
pipeline runs CFG as two calls), so each call's stale data stays its own."""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from ..comm import CommManager, CommStats, SimulatedComm, Topology
from ..comm.topology import destroy, new_group
from ..config import ParallelConfig
from ..errors import PatchError
from ..runtime import Step
from ..specs import Layer, ModelSpec
from .geometry import Bands, min_height
from .kernels import EngineOps


@dataclass
class LayerInfo:
    """Global (whole-image) shapes of a wrapped layer, measured by the meta-device trace.

    kind: "conv" / "groupnorm" / "attention"; params: conv (kernel, stride, padding, dilation) of the rows,
    GroupNorm (groups,), attention (K/V channels,). Attention: in_shape is its K/V [B, L, C] (text included),
    hw the (rows, cols) of its image token grid, text the number of text tokens in its sequence."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...] | None = None
    hw: tuple[int, int] | None = None
    kind: str = ""
    params: tuple = ()
    role: Layer | None = None
    text: int = 0


@dataclass
class ModelState:
    """Per patched denoiser (UNet or ControlNet): its geometry and comm buffers."""

    tag: str
    model_ref: weakref.ReferenceType
    comm: CommManager
    spec: ModelSpec | None = None
    denoiser: str = ""  # the denoiser's tag (`tag` adds the call's context name, e.g. "transformer[uncond]")
    signature: tuple | None = None
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    deep_height: int = 0
    grid: tuple[int, int] | None = None  # DiTs: the token grid of the current signature
    kv: dict = field(default_factory=dict)  # attention layer -> its all-gather buffers
    slot_views: dict = field(default_factory=dict)  # attention layer -> K/V views of its PCPP slots

    @property
    def model(self) -> torch.nn.Module:
        return self.model_ref()


@dataclass
class StepInfo:
    """What the layers need to know about the step that is running."""

    model: ModelState
    topo: Topology
    bands: Bands
    clock: Step
    sync: bool

    @property
    def comm(self) -> CommManager:
        return self.model.comm

    @property
    def last(self) -> bool:
        return self.clock.last

    def layer(self, key: str) -> LayerInfo:
        return self.model.layers[key]


class ParallelContext:
    def __init__(self, config: ParallelConfig, group: dist.ProcessGroup | None,
                 simulate: tuple[int, int] | None = None, latent_scale: int | None = None,
                 device: torch.device | None = None, transport=None):
        """simulate=(n, index): play band `index` of an n-rank group on this process, sending nothing
        (`transport(stats, checkpoint)` builds its CommManager, default SimulatedComm).
        latent_scale: pixels per latent row (for messages). device: the model's (groups are initialised on it).

        halodiff creates its own process groups for the patch group and the CFG split (only the member ranks
        take part, each with `config.timeout_s`), and destroys them in `close()` (unpatch)."""
        self.config = config
        self.simulated = simulate is not None
        self.latent_scale = latent_scale
        self.stats = CommStats()
        self.ops = EngineOps()
        self.active: StepInfo | None = None
        self.tracing = False
        self.strategy = None  # the mode's policy (parallel.sync / distrifusion / pcpp), set by the engine
        self.fused_silu: torch.Tensor | None = None  # a GroupNorm output that already holds its SiLU
        self.silu_passthrough: set[int] = set()  # SiLU modules that pass a fused norm's output through
        self._transport = transport or (SimulatedComm if self.simulated else CommManager)
        self._records: dict[str, LayerInfo] = {}
        self.models: dict[str, ModelState] = {}
        self._bands: dict[tuple[int, int], Bands] = {}
        self.groups: list[dist.ProcessGroup] = []
        self.graphs: dict = {}  # per denoiser tag: its StepGraphs (cuda_graphs=True)
        if simulate is not None:
            n, index = simulate
            if not 0 <= index < n:
                raise ValueError(f"simulate=(n, index) needs 0 <= index < n, got {simulate}")
            ranks, me = tuple(range(n)), index
        elif dist.is_available() and dist.is_initialized():
            ranks = tuple(sorted(dist.get_process_group_ranks(group) if group is not None
                                 else range(dist.get_world_size())))
            me = dist.get_rank()
            if me not in ranks:
                raise ValueError(f"this rank ({me}) is not in the process group passed to halodiff.patch")
        else:
            ranks, me = (0,), 0
        self.ranks, self.rank = ranks, me
        n = len(ranks)
        own = (lambda rs: self._group(rs, device)) if simulate is None and n > 1 else (lambda rs: None)
        self.full = Topology(own(ranks), ranks, ranks.index(me), own(ranks))
        self.split: Topology | None = None
        self.pair_group: dist.ProcessGroup | None = None
        self.cfg_half = 0
        if config.split_cfg and n >= 2 and n % 2 == 0 and simulate is None:
            halves = (ranks[: n // 2], ranks[n // 2:])
            self.cfg_half = 0 if me in halves[0] else 1
            mine = halves[self.cfg_half]
            i = mine.index(me)
            self.split = Topology(*((own(mine), mine, i, own(mine)) if len(mine) > 1 else (None, mine, i, None)))
            self.pair_group = own((halves[0][i], halves[1][i]))

    def _group(self, ranks: tuple[int, ...], device) -> dist.ProcessGroup:
        g = new_group(ranks, self.config.timeout_s, device)
        self.groups.append(g)
        return g

    def close(self) -> None:
        """Join every model's communication and destroy halodiff's process groups (unpatch)."""
        try:
            for m in self.models.values():
                m.comm.join()
        finally:
            destroy(self.groups)

    @property
    def world(self) -> int:
        return len(self.ranks)

    def add_model(self, tag: str, model: torch.nn.Module, spec: ModelSpec | None = None) -> ModelState:
        state = ModelState(tag, weakref.ref(model), self._transport(self.stats, self.config.comm_checkpoint), spec,
                           tag.split("[", 1)[0])
        state.comm.timeout_s = self.config.timeout_s
        self.models[tag] = state
        return state

    def model_state(self, tag: str, context: str | None) -> ModelState | None:
        """The state of denoiser `tag` for the call named `context` within a step (made at its first call)."""
        if context is None:
            return self.models.get(tag)
        key = f"{tag}[{context}]"
        st = self.models.get(key)
        if st is None and tag in self.models:
            base = self.models[tag]
            st = self.add_model(key, base.model, base.spec)
        return st

    def bands(self, deep_height: int, n: int) -> Bands:
        key = (deep_height, n)
        if key not in self._bands:
            self._bands[key] = Bands.split(deep_height, n)
        return self._bands[key]

    # ---------------------------------------------------------------------------------- trace
    def record(self, key: str, info: LayerInfo) -> None:
        self._records[key] = info

    def trace(self, state: ModelState, args: tuple, kwargs: dict, topo: Topology, sample_h: int,
              grid: tuple[int, int] | None = None) -> None:
        """Run the model on the meta device (no compute, no weights copied) so every wrapped layer
        records the global shape it sees; derive the deepest level (UNets) or take the token grid (DiTs:
        `grid`) and check the band split."""
        model = state.model
        meta = {n: t.to("meta") for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
        to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
        self._records = {}
        self.tracing = True
        try:
            with torch.no_grad():
                torch.func.functional_call(model, meta, tree_map(to_meta, args), tree_map(to_meta, kwargs))
        finally:
            self.tracing = False
        layers = self._records
        self._records = {}
        if grid is not None:
            self._place_tokens(state, layers, grid, topo)
            return
        grids = {}
        for info in layers.values():
            for shape in (info.in_shape, info.out_shape):
                if shape is not None and len(shape) == 4:
                    grids[shape[-2] * shape[-1]] = (shape[-2], shape[-1])
        for key, info in layers.items():
            if info.hw is None and len(info.in_shape) == 3:  # attention tokens [B, L, C]
                if info.in_shape[1] not in grids:
                    raise ValueError(f"halodiff: cannot place attention layer {key} (L={info.in_shape[1]}) on the "
                                     "UNet's resolution levels")
                info.hw = grids[info.in_shape[1]]
        heights = [h for h, _ in grids.values()]
        state.layers = layers
        state.deep_height = min(heights) if heights else 0
        if topo.n > 1 and state.deep_height < topo.n:
            need = min_height(sample_h, state.deep_height, topo.n)
            image = f" (image height {need * self.latent_scale} with this pipeline's VAE)" if self.latent_scale else ""
            raise ValueError(
                f"halodiff: latent height {sample_h} gives only {state.deep_height} rows at the deepest UNet level, "
                f"fewer than the {topo.n} ranks of a patch group: use a latent height of at least {need}{image} "
                "or fewer ranks"
            )

    def _place_tokens(self, state: ModelState, layers: dict[str, LayerInfo], grid: tuple[int, int],
                      topo: Topology) -> None:
        """DiT: every attention layer sees the image token grid (plus, for joint attention, its text tokens)."""
        rows, cols = grid
        for key, info in layers.items():
            if info.kind != "attention":
                continue
            text = info.in_shape[1] - rows * cols
            joint = info.role is not None and info.role.role == "joint_attention"
            if text < 0 or (text and not joint):
                raise PatchError(f"halodiff: {key}: its attention sees {info.in_shape[1]} tokens, but the image has "
                                 f"{rows}x{cols} tokens" + ("" if joint else " and it is not joint attention"))
            info.hw, info.text = grid, text
        state.layers = layers
        state.deep_height = rows
        if topo.n > 1 and rows < topo.n:
            raise ValueError(f"halodiff: the {rows}x{cols} token grid has fewer token rows ({rows}) than the {topo.n} "
                             "ranks of a patch group: use a larger image or fewer ranks")

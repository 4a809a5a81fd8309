"""Band attention (self-attention over the image tokens, and joint image + text attention), intercepted at the
scaled-dot-product level.

`BandAttention` wraps the module's own processor and runs it unchanged on the band's tokens; only its
`F.scaled_dot_product_attention(q, k, v)` call (direct, or through diffusers' attention dispatcher) is replaced,
through a `TorchFunctionMode` active during the processor call, by attention over the K/V segments the step's
mechanism provides. So any processor that computes its attention with one SDPA works unchanged (plain, fused
QKV, QK norms, RoPE, joint text + image) and nothing of diffusers is copied.

Joint attention (SD3, Flux, Qwen-Image): the SDPA sequence is [text, band] or [band, text]; text tokens are
replicated (every rank computes all of them), so their K/V are one local segment and only image K/V travel.
Queries are the whole local sequence (text queries attend to every band too).

Mechanisms (the strategy picks one per step), all over the image tokens' K/V:
- `fresh`: all-gather every band's K/V now and wait (exact; also fills PCPP's partial-row slots in its warm-up);
- `stale` (DistriFusion): the other bands' K/V from the previous step's all-gather, own band fresh; this step's
  all-gather is posted right after the attention (not on the last step);
- `partial` (PCPP): own band fresh plus the last ceil(p·h) rows of the band above and the first ceil(p·h) of
  the band below, from the previous step; only those rows travel, point to point in the neighbour messages.
The segments go to `segmented_attention` as they are: nothing is concatenated. Cross-attention and
single-rank runs call the processor as it is.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...comm.manager import RowSpec
from ...errors import PatchError
from ...specs import Layer
from ..state import LayerInfo, ParallelContext, StepInfo

KIND = "attention"
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def pcpp_rows(p: float, h: int) -> int:
    """Rows of a neighbour band of height h that a pcpp band attends to."""
    return min(h, math.ceil(p * h - 1e-9))


class _SDPAIntercept(TorchFunctionMode):
    """Routes the processor's F.scaled_dot_product_attention call to `handler`; everything else runs as is."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.handler(*args, **kwargs)
        return func(*args, **kwargs)


def _sdpa_args(args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    return bound


# ---------------------------------------------------------------------------------------- K/V buffers
@dataclass
class KVBuffers:
    """Persistent all-gather buffers of one attention layer: send [B, Lmax, 2C], recv [n, B, Lmax, 2C], and
    their K/V views, made once: `send_k`/`send_v` [B, L, H, D] to write this band into, `segments` the
    [B, H, L_i, D] K/V of every band i as the recv buffer holds them."""

    shape: tuple
    send: torch.Tensor
    recv: torch.Tensor
    lens: list[int]
    payload: dict[str, int]
    send_k: torch.Tensor
    send_v: torch.Tensor
    segments: list[tuple[torch.Tensor, torch.Tensor]]


def split_kv(kv: torch.Tensor, heads: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, 2C] -> K, V views [B, heads, L, D] (strided, no copy)."""
    B, L, _ = kv.shape
    C = heads * D
    return kv[..., :C].view(B, L, heads, D).transpose(1, 2), kv[..., C:].view(B, L, heads, D).transpose(1, 2)


def kv_buffers(step: StepInfo, key: str, k: torch.Tensor, rows: int, cols: int) -> KVBuffers:
    topo = step.topo
    lens = [h * cols for h in step.bands.heights(rows)]
    B, H, L, D = k.shape
    C2 = 2 * H * D
    shape = (topo.ranks, B, max(lens), C2, k.dtype, k.device)
    buf = step.model.kv.get(key)
    if buf is None or buf.shape != shape:
        esize = k.element_size()
        send, recv = k.new_zeros(B, max(lens), C2), k.new_zeros(topo.n, B, max(lens), C2)
        mine = send[:, :L].view(B, L, 2, H, D)
        buf = step.model.kv[key] = KVBuffers(
            shape, send, recv, lens,
            dict(payload_received=(sum(lens) - L) * B * C2 * esize, payload_sent=L * B * C2 * esize * (topo.n - 1)),
            mine[:, :, 0], mine[:, :, 1], [split_kv(recv[i, :, :n], H, D) for i, n in enumerate(lens)])
    return buf


def _gather(step: StepInfo, buf: KVBuffers, k: torch.Tensor, v: torch.Tensor, key: str | None = None) -> None:
    """All-gather this band's K/V into `buf.recv`: fresh, or (with `key`) posted for the next step."""
    buf.send_k.copy_(k.transpose(1, 2))
    buf.send_v.copy_(v.transpose(1, 2))
    step.comm.all_gather(buf.recv, buf.send, step.topo, "attention", key=key, **buf.payload)


def _bands(step: StepInfo, buf: KVBuffers, k: torch.Tensor, v: torch.Tensor):
    """K/V segments of every band in row order: the own band fresh, the others from `buf.recv`."""
    j = step.topo.index
    return ([k if i == j else s[0] for i, s in enumerate(buf.segments)],
            [v if i == j else s[1] for i, s in enumerate(buf.segments)])


def slots(key: str, info: LayerInfo, step: StepInfo, p: float) -> RowSpec:
    """PCPP: the layer's K/V rows in the neighbour messages, [B, rows, cols·2C]."""
    (rows, cols), j, n = info.hw, step.topo.index, step.topo.n
    h = step.bands.heights(rows)
    mine = pcpp_rows(p, h[j])
    return RowSpec(key, "attention", (info.in_shape[0],), cols * 2 * info.params[0], mine, mine,
                   pcpp_rows(p, h[j - 1]) if j > 0 else 0, pcpp_rows(p, h[j + 1]) if j + 1 < n else 0)


# ------------------------------------------------------------------------------------------ mechanisms
# Each returns (K segments, V segments, after): the image tokens' segments in row order, and what to do once the
# attention has read them (post this step's data; None: nothing).
def fresh(step: StepInfo, key: str, k, v, rows: int, cols: int):
    buf = kv_buffers(step, key, k, rows, cols)
    step.comm.arrive(key)  # an all-gather of the previous generation may still be writing `buf.recv`
    _gather(step, buf, k, v)
    if step.comm.has_rows(key):  # PCPP's warm-up: keep the rows its first partial step attends to
        _keep_partial_rows(step, buf, key, cols)
    ks, vs = _bands(step, buf, k, v)
    return ks, vs, None


def stale(step: StepInfo, key: str, k, v, rows: int, cols: int):
    buf = kv_buffers(step, key, k, rows, cols)
    step.comm.arrive(key)  # the previous step's all-gather
    ks, vs = _bands(step, buf, k, v)
    # the next step reads this one's K/V: it travels until that step reaches this layer
    after = (lambda: _gather(step, buf, k, v, key=key)) if step.comm.sending else None
    return ks, vs, after


@dataclass
class _SlotViews:
    layout: object  # the comm layout they view (a new layout makes new views)
    stale: list  # (K, V) of the rows above (if any), then below (if any)
    below: bool
    send: list  # (K dst, V dst, first token, end token or 0 = the band's end)


def _slot_views(step: StepInfo, key: str, k) -> _SlotViews:
    """The K/V views of a layer's static slots, made once per layout: stale segments to attend to, and the
    [B, r·cols, H, D] halves of the send slots with the token range of the band they take."""
    views = step.model.slot_views.get(key)
    if views is not None and views.layout is step.comm.layout:
        return views
    up, down = step.comm.send_slots(key)
    top, bot = step.comm.recv_slots(key)
    B, H, L, D = k.shape
    stale_ = [split_kv(t.reshape(B, -1, 2 * H * D), H, D) for t in (top, bot) if t is not None]
    send = []
    for slot, at_top in ((up, True), (down, False)):
        if slot is not None:
            n = slot.shape[-2] * slot.shape[-1] // (2 * H * D)  # tokens in the slot
            d = slot.reshape(B, n, 2, H, D)
            send.append((d[:, :, 0], d[:, :, 1], 0 if at_top else L - n, n if at_top else 0))
    views = step.model.slot_views[key] = _SlotViews(step.comm.layout, stale_, bot is not None, send)
    return views


def partial(step: StepInfo, key: str, k, v, rows: int, cols: int):
    step.comm.arrive(key)  # the message with the neighbours' rows of the previous step
    views = _slot_views(step, key, k)
    ks = [s[0] for s in views.stale] + [k]
    vs = [s[1] for s in views.stale] + [v]
    if views.below:  # the stale rows below come after the own band
        ks.append(ks.pop(-2))
        vs.append(vs.pop(-2))

    def after():  # this band's boundary K/V rows, for the neighbours' next step, straight into the slots
        L = k.shape[2]
        for dk, dv, start, end in views.send:
            dk.copy_(k[:, :, start: end if end else L].transpose(1, 2))
            dv.copy_(v[:, :, start: end if end else L].transpose(1, 2))
        step.comm.queue_rows(key, step.topo)

    return ks, vs, (after if step.comm.sending else None)


def _keep_partial_rows(step: StepInfo, buf: KVBuffers, key: str, cols: int) -> None:
    """After a fresh gather: copy the neighbour rows the next partial step attends to into the layer's slots."""
    top, bot = step.comm.recv_slots(key)
    j = step.topo.index
    heights = [n // cols for n in buf.lens]
    if top is not None:
        r = top.shape[-2]
        top.copy_(buf.recv[j - 1, :, (heights[j - 1] - r) * cols: heights[j - 1] * cols].unflatten(1, (r, cols))
                  .flatten(2))
    if bot is not None:
        r = bot.shape[-2]
        bot.copy_(buf.recv[j + 1, :, : r * cols].unflatten(1, (r, cols)).flatten(2))


MECHANISMS = {"fresh": fresh, "stale": stale, "partial": partial}


# -------------------------------------------------------------------------------------- the processor
def install(ctx: ParallelContext, inst, key: str, attn, layer: Layer, modules: dict) -> None:
    if layer.role == "cross_attention":
        return  # queries are band tokens, K/V the text: band-local as it is
    inst.processor(attn, lambda inner: BandAttention(ctx, key, inner, layer))


class BandAttention:
    """Processor wrapper of a self / joint attention layer of a patched model.

    Instances are of a subclass per inner processor class whose `__call__` carries that class's signature:
    diffusers filters `cross_attention_kwargs` by `inspect.signature(processor.__call__)`, so the same kwargs
    reach the inner processor as without halodiff (and torch.compile sees one `__call__` per class)."""

    def __new__(cls, ctx: ParallelContext, key: str, inner, layer: Layer | None = None):
        return object.__new__(_subclass_for(type(inner)) if cls is BandAttention else cls)

    def __init__(self, ctx: ParallelContext, key: str, inner, layer: Layer | None = None):
        self.ctx, self.key, self.inner = ctx, key, inner
        self.layer = layer or Layer("self_attention")

    def __getattr__(self, name: str):  # processor attributes other code may read (e.g. IP-adapter scales)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, attn, *args, **kwargs):
        ctx, step = self.ctx, self.ctx.active
        if self.layer.role == "self_attention" and _encoder_states(self.inner, args, kwargs) is not None:
            return self.inner(attn, *args, **kwargs)  # a self-attention module used for cross-attention
        if ctx.tracing:
            mode = _SDPAIntercept(self._record)
        elif step is None or step.topo.n == 1:
            return self.inner(attn, *args, **kwargs)
        else:
            if getattr(attn, "group_norm", None) is not None:
                raise PatchError(f"halodiff: {self.key}: attention with a group_norm over its tokens cannot be "
                                 "split into bands")
            mode = _SDPAIntercept(lambda *a, **k: self._sdpa(step, **_sdpa_args(a, k)))
        with mode:
            out = self.inner(attn, *args, **kwargs)
        if mode.calls != 1:
            raise PatchError(
                f"halodiff: {self.key}: its attention processor ({type(self.inner).__name__}) called "
                f"F.scaled_dot_product_attention {mode.calls} times; patch parallelism needs exactly one SDPA call "
                "per self-attention. Use diffusers' AttnProcessor2_0 (pipe.unet.set_attn_processor(AttnProcessor2_0())) "
                "before halodiff.patch")
        return out

    def _record(self, *args, **kwargs):
        """Meta-device trace: the SDPA's K/V shape ([B, H, L, D]) is the layer's global shape."""
        a = _sdpa_args(args, kwargs)
        k = a["key"]
        B, H, L, D = k.shape
        self.ctx.record(self.key, LayerInfo((B, L, H * D), kind=KIND, params=(H * D,), role=self.layer))
        return F.scaled_dot_product_attention(*args, **kwargs)

    def _sdpa(self, step: StepInfo, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        q, k, v = query, key, value
        info = step.layer(self.key)
        if k.shape[2] == info.in_shape[1]:  # replicated input (the whole sequence): nothing to exchange
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if is_causal or dropout_p or enable_gqa or k.shape[1] != q.shape[1]:
            raise PatchError(f"halodiff: {self.key}: band attention supports plain softmax attention only (no "
                             "causal mask, dropout or grouped-query heads)")
        if attn_mask is not None and not self.layer.text_mask:
            raise PatchError(f"halodiff: {self.key}: an attention mask over image tokens cannot be split into bands "
                             "(only text-token masks of joint attention are supported)")
        rows, cols = info.hw
        text = info.text
        band = step.bands.heights(rows)[step.topo.index] * cols
        if k.shape[2] != band + text or q.shape[2] != k.shape[2]:
            raise PatchError(f"halodiff: {self.key}: the attention's sequence ({k.shape[2]} tokens) is not this rank's "
                             f"band of the {rows}x{cols} token grid ({band} tokens) plus {text} text tokens")
        first = self.layer.text == "first"
        img = slice(text, None) if first else slice(0, band)
        ks, vs, after = MECHANISMS[self.ctx.strategy.mechanism(KIND, step.sync)](
            step, self.key, k[:, :, img], v[:, :, img], rows, cols)
        if text:
            txt = slice(0, text) if first else slice(band, None)
            ks = [k[:, :, txt], *ks] if first else [*ks, k[:, :, txt]]
            vs = [v[:, :, txt], *vs] if first else [*vs, v[:, :, txt]]
        if attn_mask is not None:
            out = _masked(q, ks, vs, attn_mask, text, first, scale, self.key)
        else:
            out = self.ctx.ops.segmented_attention(q, ks, vs, scale)
        if after is not None:
            after()
        return out


def _encoder_states(inner, args: tuple, kwargs: dict):
    if "encoder_hidden_states" in kwargs:
        return kwargs["encoder_hidden_states"]
    return args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None


def _masked(q, ks, vs, mask: torch.Tensor, text: int, first: bool, scale, key: str) -> torch.Tensor:
    """Joint attention with a key mask over the text tokens: the text part of the processor's mask, all-true for
    every image segment (torch's SDPA on the concatenated segments; the kernels take no masks)."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise PatchError(f"halodiff: {key}: only key masks [B, 1, 1, L] are supported in band attention, got "
                         f"{tuple(mask.shape)}")
    L = mask.shape[-1]
    text_mask = mask[..., :text] if first else mask[..., L - text:]
    n_img = sum(s.shape[2] for s in ks) - text
    ones = torch.ones(*mask.shape[:-1], n_img, dtype=mask.dtype, device=mask.device)
    if mask.dtype != torch.bool:
        ones = torch.zeros_like(ones)  # additive mask: 0 = attend
    full = torch.cat([text_mask, ones] if first else [ones, text_mask], dim=-1)
    return F.scaled_dot_product_attention(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2), attn_mask=full, scale=scale)


@functools.cache
def _subclass_for(inner_cls: type) -> type:
    call = functools.wraps(inner_cls.__call__)(lambda self, *a, **k: BandAttention.__call__(self, *a, **k))
    return type(f"BandAttention[{inner_cls.__name__}]", (BandAttention,), {"__call__": call})

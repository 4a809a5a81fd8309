"""Band self-attention for diffusers `Attention` modules, intercepted at the scaled-dot-product level.

`BandAttention` wraps the module's own processor and runs it unchanged on the band's tokens; only its
`F.scaled_dot_product_attention(q, k, v)` call is replaced (through a `TorchFunctionMode` active during the
processor call) by attention over the K/V of every band that the mode's exchange strategy provides
(`ctx.exchange.attention`). So any processor that computes self-attention with SDPA works unchanged (plain,
fused QKV projections, QK norms, rotary embeddings applied before SDPA) and nothing of diffusers is copied.
Cross-attention (attn2) and single-rank runs call the processor as it is.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import PatchError
from .state import LayerInfo, ParallelContext, StepInfo


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


class BandAttention:
    """Processor wrapper of a self-attention layer of a patched model.

    Instances are of a subclass per inner processor class whose `__call__` carries that class's signature:
    diffusers filters `cross_attention_kwargs` by `inspect.signature(processor.__call__)`, so the same kwargs
    reach the inner processor as without halodiff (and torch.compile sees one `__call__` per class)."""

    def __new__(cls, ctx: ParallelContext, key: str, inner):
        return object.__new__(_subclass_for(type(inner)) if cls is BandAttention else cls)

    def __init__(self, ctx: ParallelContext, key: str, inner):
        self.ctx, self.key, self.inner = ctx, key, inner

    def __getattr__(self, name: str):  # processor attributes other code may read (e.g. IP-adapter scales)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        ctx, step = self.ctx, self.ctx.active
        call = lambda: self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)  # noqa: E731
        if encoder_hidden_states is not None:
            return call()
        if ctx.tracing:
            shape = tuple(hidden_states.shape)
            kv_channels = getattr(attn, "inner_kv_dim", None) or attn.inner_dim
            ctx.record(self.key, LayerInfo(shape, hw=tuple(shape[-2:]) if len(shape) == 4 else None, kind="attention",
                                           params=(kv_channels,)))
            return call()
        if step is None or step.topo.n == 1:
            return call()
        rows, cols = step.layer(self.key).hw
        tokens = hidden_states.shape[-2] * hidden_states.shape[-1] if hidden_states.ndim == 4 else hidden_states.shape[1]
        if tokens == rows * cols:  # replicated input: nothing to exchange
            return call()
        if attention_mask is not None or getattr(attn, "group_norm", None) is not None:
            raise PatchError(f"halodiff: {self.key}: self-attention with a mask or a group_norm cannot be split into "
                             "bands")
        mode = _SDPAIntercept(lambda *a, **k: self._sdpa(step, rows, cols, *a, **k))
        with mode:
            out = call()
        if mode.calls != 1:
            raise PatchError(
                f"halodiff: {self.key}: its attention processor ({type(self.inner).__name__}) called "
                f"F.scaled_dot_product_attention {mode.calls} times; patch parallelism needs exactly one SDPA call "
                "per self-attention. Use diffusers' AttnProcessor2_0 (pipe.unet.set_attn_processor(AttnProcessor2_0())) "
                "before halodiff.patch")
        return out

    def _sdpa(self, step: StepInfo, rows: int, cols: int, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, enable_gqa=False):
        if attn_mask is not None or is_causal or dropout_p or enable_gqa or k.shape[1] != q.shape[1]:
            raise PatchError(f"halodiff: {self.key}: band attention supports plain softmax attention only (no mask, "
                             "causal, dropout or grouped-query heads)")
        if k.shape[2] != step.bands.heights(rows)[step.topo.index] * cols:
            raise PatchError(f"halodiff: {self.key}: the attention's token count ({k.shape[2]}) is not this rank's "
                             f"band of the {rows}x{cols} token grid")
        return self.ctx.exchange.attention(step, self.key, q, k, v, rows, cols, scale)


@functools.cache
def _subclass_for(inner_cls: type) -> type:
    call = functools.wraps(inner_cls.__call__)(lambda self, *a, **k: BandAttention.__call__(self, *a, **k))
    return type(f"BandAttention[{inner_cls.__name__}]", (BandAttention,), {"__call__": call})

"""segmented_attention per backend vs the torch baseline (torch.cat of the K/V segments + SDPA) at SD shapes.

Each case is one rank's attention in a patch-parallel step: q = the rank's band of a latent's tokens, K/V
segments = what that rank attends to. PCPP (halo_fraction 0.3): own band + ceil(0.3 · band rows) latent
rows of each neighbour; DistriFusion: every rank's band. DiTs (SD3-medium, Flux.1 at 1024 px, 2 and 4 ranks;
shapes.joint_attention_rank): joint attention, q = the rank's band + every text token, the text as one more K/V
segment; the smoke run (`--benchmark-disable`) runs them with SMOKE_HEADS heads. TFLOP/s counts the two matmuls
(4 · B · H · Lq · Lk · D); `ratio_vs_torch` (bench/conftest.py) = baseline ms / backend ms of the same run.
CPU runs fp32 (the Triton interpreter is not benchmarked); GPUs fp16.

    pytest bench/test_segmented_attention_bench.py                         # numbers + bench_out/*.csv/json
    pytest bench/test_segmented_attention_bench.py --benchmark-disable     # quick smoke run
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA
from halodiff import ops
from halodiff.ops import registry
from shapes import joint_attention_rank

DTYPE = torch.float16 if HAS_CUDA else torch.float32
BACKENDS = [b for b in ("cuda", "triton", "cpu", "reference")
            if not registry.backend_reasons(b) and not registry.device_reasons(b, torch.device(DEVICE))]

# name: (B, heads, head dim, query rows, K/V segment lengths). Latent rows x width = tokens.
CASES = {
    # SD1.5, 64x64 latent (4096 tokens), 8 heads x 40.
    "sd15_64x64_pcpp_n2": (2, 8, 40, 32 * 64, [32 * 64, 10 * 64]),  # own band + 10 rows of the other band
    "sd15_64x64_pcpp_n4_mid": (2, 8, 40, 16 * 64, [5 * 64, 16 * 64, 5 * 64]),  # halo above, own, halo below
    "sd15_64x64_distrifusion_n2": (2, 8, 40, 32 * 64, [32 * 64, 32 * 64]),  # all bands, one per rank
    "sd15_64x64_distrifusion_n4": (2, 8, 40, 16 * 64, [16 * 64] * 4),
    # SD1.5 deeper levels: 32x32 latent with 8 heads x 80, 16x16 with 8 heads x 160.
    "sd15_32x32_pcpp_n2_d80": (2, 8, 80, 16 * 32, [16 * 32, 5 * 32]),
    "sd15_16x16_pcpp_n2_d160": (2, 8, 160, 8 * 16, [8 * 16, 3 * 16]),
    # SDXL: 10 heads x 64 at 64x64 (4096 tokens), 20 heads x 64 at 32x32 (1024 tokens).
    "sdxl_64x64_pcpp_n2_d64": (2, 10, 64, 32 * 64, [32 * 64, 10 * 64]),
    "sdxl_32x32_pcpp_n2_d64": (2, 20, 64, 16 * 32, [16 * 32, 5 * 32]),
}
# DiT joint attention at 1024 px (64x64 image tokens, 24 heads): SD3 D=64 + 333 text tokens, Flux D=128 + 512.
DIT_CASES = {f"{model}_1024_{mode}_n{n}": joint_attention_rank(model, n, mode)
             for model in ("sd3", "flux") for n in (2, 4) for mode in ("distrifusion", "pcpp")}
CASES.update(DIT_CASES)
# Heads in the smoke run (the token layout, head dim and segments stay): a full DiT case is 33-145 GFLOP per call.
SMOKE_HEADS = dict.fromkeys(DIT_CASES, 1)


def _inputs(B, H, D, Lq, lens):
    """Attention inputs as a UNet makes them: [B, L, H*D] projections viewed as [B, H, L, D] (strided)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def proj(L):
        return torch.randn(B, L, H * D, device=DEVICE, generator=g).to(DTYPE).view(B, L, H, D).transpose(1, 2)

    return proj(Lq), [proj(n) for n in lens], [proj(n) for n in lens]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_segmented_attention(bench, smoke, backend, case):
    B, H, D, Lq, lens = CASES[case]
    if smoke:
        H = SMOKE_HEADS.get(case, H)
    q, ks, vs = _inputs(B, H, D, Lq, lens)
    flops = 4.0 * B * H * Lq * sum(lens) * D
    if backend == "torch":
        def fn():
            return F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))
    else:
        def fn():
            with ops.use_backend(backend):
                return ops.segmented_attention(q, ks, vs)
    shape = (B, H, Lq, D, "+".join(map(str, lens)))
    out = bench(fn, name="segmented_attention", group=f"segmented_attention_{case}", shape=shape, dtype=DTYPE,
                backend=backend, flops=flops)
    if backend != "torch":
        want = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))
        tol = 1e-4 if DTYPE == torch.float32 else 2e-2
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)

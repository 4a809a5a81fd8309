"""Layer shapes of real models for the benchmarks: DiT joint attention per rank (from the published configs)."""
from __future__ import annotations

# DiT joint attention (text and image tokens in one SDPA) at 1024 px: a 128x128 latent in 2x2 patches = 64x64 image
# tokens. SD3-medium (diffusers SD3Transformer2DModel config): 24 heads x 64, text = 77 CLIP + 256 T5 tokens after
# the image tokens, batch 2 (classifier-free guidance). Flux.1-dev (FluxTransformer2DModel): 24 heads x 128, 512 T5
# tokens before the image tokens, batch 1 (guidance-distilled). Qwen-Image has Flux's head dim and text order, PixArt
# SD3's head dim (cross-attention: its text is not in the self-attention).
DIT_JOINT = {
    "sd3": dict(batch=2, heads=24, head_dim=64, text=333, text_first=False, grid=(64, 64)),
    "flux": dict(batch=1, heads=24, head_dim=128, text=512, text_first=True, grid=(64, 64)),
}


def joint_attention_rank(model: str, ranks: int, mode: str,
                         halo_fraction: float = 0.3) -> tuple[int, int, int, int, list[int]]:
    """(B, heads, head dim, query rows, K/V segment lengths) of one rank's joint attention in a patch-parallel step
    of a DiT (DIT_JOINT): the image token grid is cut into `ranks` bands of whole token rows; the rank's queries are
    its band + every text token. Keys/values: "distrifusion": [text, band 0, ..., band N-1] (the other bands from
    the previous step); "pcpp": [text, ceil(halo_fraction x band rows) token rows of the band above, own band, as
    many of the band below] for rank 0 of 2 (no band above: an empty segment) or rank 1 of 4 and more (both)."""
    import math

    cfg = DIT_JOINT[model]
    rows, cols = cfg["grid"]
    band_rows = [rows // ranks + (r < rows % ranks) for r in range(ranks)]
    rank = 0 if ranks == 2 else 1
    own = band_rows[rank] * cols
    if mode == "distrifusion":
        lens = [cfg["text"]] + [n * cols for n in band_rows]
    elif mode == "pcpp":
        halo = math.ceil(halo_fraction * band_rows[rank])
        above = min(halo, band_rows[rank - 1]) * cols if rank > 0 else 0
        below = min(halo, band_rows[rank + 1]) * cols if rank + 1 < ranks else 0
        lens = [cfg["text"], above, own, below]
    else:
        raise ValueError(f"mode must be 'distrifusion' or 'pcpp', got {mode!r}")
    return cfg["batch"], cfg["heads"], cfg["head_dim"], own + cfg["text"], lens

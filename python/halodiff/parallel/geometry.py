"""Row bands of every UNet resolution level, derived from the deepest level.

The deepest level's h_L rows are split into N contiguous bands whose sizes differ by at most one
(the extra rows go to the last ranks, whose bands are clipped at finer levels). A level with global
height h sits k halvings above the deepest (the smallest k with h <= 2^k * h_L); its band i is
[2^k * s_i, 2^k * s_{i+1}) clipped to h. A stride-2 conv therefore maps the band of level k exactly
onto the band of level k+1, and every band start above the deepest level is even.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bands:
    n: int
    deep_height: int
    deep_starts: tuple[int, ...]  # n + 1 boundaries at the deepest level

    @classmethod
    def split(cls, deep_height: int, n: int) -> Bands:
        q, extra = divmod(deep_height, n)
        sizes = [q + (1 if i >= n - extra else 0) for i in range(n)]
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        return cls(n, deep_height, tuple(starts))

    def level(self, height: int) -> int:
        """Halvings between a level of global height `height` and the deepest level."""
        k = max(0, math.ceil(math.log2(height / self.deep_height))) if height > self.deep_height else 0
        while (self.deep_height << k) < height:
            k += 1
        while k > 0 and (self.deep_height << (k - 1)) >= height:
            k -= 1
        if not ((self.deep_height - 1) << k) < height <= (self.deep_height << k):
            raise ValueError(
                f"a UNet level of height {height} is not a 2^k multiple of the deepest level ({self.deep_height} rows); "
                "this model's resolution chain is not supported by halodiff's band split"
            )
        return k

    def bounds(self, height: int) -> tuple[tuple[int, int], ...]:
        """(start, end) rows of every band at the level with global height `height`."""
        k = self.level(height)
        edges = [min(s << k, height) for s in self.deep_starts]
        edges[-1] = height
        return tuple((edges[i], edges[i + 1]) for i in range(self.n))

    def heights(self, height: int) -> tuple[int, ...]:
        return tuple(e - s for s, e in self.bounds(height))


def min_height(sample_height: int, deep_height: int, n: int) -> int:
    """Smallest sample height giving at least `n` deepest-level rows (for error messages)."""
    k = 0
    while (deep_height << k) < sample_height:
        k += 1
    # ceil-halving k times: rows = ceil(H / 2^k) >= n  <=>  H >= (n - 1) * 2^k + 1
    return (n - 1) * (1 << k) + 1


def conv_rows(out_start: int, out_end: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """Input rows [a, b) a conv needs to produce output rows [out_start, out_end) (may exceed the image)."""
    a = out_start * stride - padding
    b = (out_end - 1) * stride - padding + dilation * (kernel - 1) + 1
    return a, b

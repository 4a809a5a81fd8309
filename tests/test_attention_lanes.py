"""The v2 segmented-attention kernel's warp-level maps, checked on the CPU against a numpy model of the PTX ISA.

csrc/attention_layout.cuh holds the index math the kernel runs (swizzle, ldmatrix lane addresses, copy units,
fragment maps, tile walk, splits); a ctypes shim of it (halodiff.audit.layout_lib) is called here. The
ISA side is written from the PTX ISA tables, independently of the header:
- mma.m16n8k16 (.f16/.bf16): A a0..a7: row = g (+8 for i in {2,3,6,7}), col = 2t + (i & 1) (+8 for i >= 4);
  B b0..b3: k = 2t + (i & 1) (+8 for i >= 2), n = g; C c0..c3: row = g (+8 for i >= 2), col = 2t + (i & 1);
  g = lane >> 2, t = lane & 3; register j holds elements 2j (low half) and 2j + 1.
- ldmatrix.m8n8.x4.b16: lanes 8m..8m+7 give the row addresses of matrix m; lane l receives register m =
  (M[l >> 2][2 (l & 3)], M[l >> 2][2 (l & 3) + 1]), with .trans (M[2 (l & 3)][l >> 2], M[2 (l & 3) + 1][l >> 2]).
- Shared memory: 32 banks of 4 bytes; a 16-byte-per-lane access (ldmatrix phase, 128-bit store) is served
  8 lanes at a time and is conflict-free when those 8 addresses fall in 8 distinct 16-byte bank groups.
"""
from __future__ import annotations

import ctypes
import math
import shutil

import numpy as np
import pytest

PADDED_DIMS = [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
TILES = [(4, 1), (4, 2), (1, 1)]  # (warps, m-tiles per warp)


def _load_audit():
    import halodiff.audit as ka

    return ka


@pytest.fixture(scope="module")
def hd():
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no host C++ compiler for the attention_layout.cuh shim")
    return _load_audit().layout_lib()


def _pair(fn, *args):
    out = (ctypes.c_int * 3)()
    fn(*args, out)
    return out[0], out[1]


def _configs(hd):
    """(dp, warps, mt) of every instantiated v2 kernel."""
    return [(dp, w, mt) for dp in PADDED_DIMS for w, mt in TILES if hd.hd_v2_tile_supported(dp, w, mt)]


# ---- the ISA model ----


def isa_a(lane, i):
    g, t = lane >> 2, lane & 3
    return g + 8 * (i in (2, 3, 6, 7)), 2 * t + (i & 1) + 8 * (i >= 4)


def isa_b(lane, i):  # (k, n)
    g, t = lane >> 2, lane & 3
    return 2 * t + (i & 1) + 8 * (i >= 2), g


def isa_c(lane, i):
    g, t = lane >> 2, lane & 3
    return g + 8 * (i >= 2), 2 * t + (i & 1)


def ldmatrix_x4(smem_rows, addresses, trans):
    """smem_rows: physical 16-byte chunk -> 8 tags; addresses[lane] = physical chunk. -> regs[lane][m][half]."""
    regs = [[[None, None] for _ in range(4)] for _ in range(32)]
    for m in range(4):
        mat = [smem_rows[addresses[8 * m + r]] for r in range(8)]
        for lane in range(32):
            for half in range(2):
                if trans:
                    regs[lane][m][half] = mat[2 * (lane & 3) + half][lane >> 2]
                else:
                    regs[lane][m][half] = mat[lane >> 2][2 * (lane & 3) + half]
    return regs


def tagged_tile(hd, rows, chunks):
    """Physical chunk -> the 8 (row, col) tags that the swizzled layout stores there."""
    smem = {}
    for r in range(rows):
        for c in range(chunks):
            smem[hd.hd_swizzle_chunk(r, c, rows, chunks)] = [(r, 8 * c + e) for e in range(8)]
    return smem


def conflict_free(chunks16):
    """8 lanes of one 16-byte phase hit 8 distinct bank groups."""
    return len({c % 8 for c in chunks16}) == len(chunks16)


# ---- fragment maps ----


def test_accumulator_map_is_the_isa_c_fragment(hd):
    for lane in range(32):
        for i in range(4):
            assert (hd.hd_acc_row(lane, i), hd.hd_acc_col(lane, i)) == isa_c(lane, i)


def test_p_accumulators_repacked_as_the_a_operand(hd):
    """S n-tiles 2c and 2c+1 (keys 16c..16c+15) re-used in registers as the A operand of P.V."""
    for lane in range(32):
        for reg in range(4):
            for half in range(2):
                tile, e = hd.hd_acc_as_a_tile(reg), hd.hd_acc_as_a_elem(reg, half)
                row, col = isa_c(lane, e)
                assert (row, col + 8 * tile) == isa_a(lane, 2 * reg + half)


@pytest.mark.parametrize("dp", PADDED_DIMS)
def test_q_ldmatrix_gives_a_fragments(hd, dp):
    chunks, rows = dp // 8, 64
    smem = tagged_tile(hd, rows, chunks)
    for row0 in range(0, rows, 16):
        for kk in range(dp // 16):
            addr = []
            for lane in range(32):
                r, c = _pair(hd.hd_ldsm_rows_then_chunks, lane)
                addr.append(hd.hd_swizzle_chunk(row0 + r, 2 * kk + c, rows, chunks))
            regs = ldmatrix_x4(smem, addr, trans=False)
            for lane in range(32):
                for reg in range(4):
                    for half in range(2):
                        r, c = isa_a(lane, 2 * reg + half)
                        assert regs[lane][reg][half] == (row0 + r, 16 * kk + c)


# B operands of two n-tiles from one ldmatrix.x4: K stored [key][dim] (B[k][n] = K[n][k], plain) and V stored
# [key][dim] (B[k][n] = V[k][n], .trans). Per operand: the lane map, .trans, the window (row0, chunk0) of mma
# step `step` / n-tile pair `pair`, and the tile element that B[k][n] of n-tile 2 pair + nt must be.
B_OPERANDS = {
    "K": ("hd_ldsm_chunks_then_rows", False, lambda step, pair: (16 * pair, 2 * step),
          lambda step, pair, nt, k, n: (16 * pair + 8 * nt + n, 16 * step + k)),
    "V": ("hd_ldsm_rows_then_chunks", True, lambda step, pair: (16 * step, 2 * pair),
          lambda step, pair, nt, k, n: (16 * step + k, 16 * pair + 8 * nt + n)),
}


@pytest.mark.parametrize("operand", list(B_OPERANDS))
@pytest.mark.parametrize("dp", PADDED_DIMS)
def test_k_and_v_ldmatrix_give_b_fragments_of_two_n_tiles(hd, dp, operand):
    """Registers {0, 1} = B fragment of n-tile 2 pair, {2, 3} = of n-tile 2 pair + 1."""
    lane_map, trans, window, want = B_OPERANDS[operand]
    chunks, rows = dp // 8, 64
    smem = tagged_tile(hd, rows, chunks)
    steps, pairs = (dp // 16, rows // 16) if operand == "K" else (rows // 16, dp // 16)
    for step in range(steps):
        for pair in range(pairs):
            row0, chunk0 = window(step, pair)
            addr = []
            for lane in range(32):
                r, c = _pair(getattr(hd, lane_map), lane)
                addr.append(hd.hd_swizzle_chunk(row0 + r, chunk0 + c, rows, chunks))
            regs = ldmatrix_x4(smem, addr, trans=trans)
            for lane in range(32):
                for nt in range(2):
                    for breg in range(2):
                        for half in range(2):
                            k, n = isa_b(lane, 2 * breg + half)
                            assert regs[lane][2 * nt + breg][half] == want(step, pair, nt, k, n)


# ---- swizzle: bijection, conflict-free phases, the split address forms the kernel uses ----


@pytest.mark.parametrize("dp", PADDED_DIMS)
def test_swizzle_is_a_bijection_and_ldmatrix_phases_are_conflict_free(hd, dp):
    chunks = dp // 8
    for rows in (16, 32, 64, 128):
        phys = {hd.hd_swizzle_chunk(r, c, rows, chunks) for r in range(rows) for c in range(chunks)}
        assert phys == set(range(rows * chunks))
        for r0 in range(0, rows, 8):
            for c in range(chunks):
                assert conflict_free([hd.hd_swizzle_chunk(r0 + r, c, rows, chunks) for r in range(8)])


@pytest.mark.parametrize("dp", PADDED_DIMS)
def test_ldmatrix_address_split(hd, dp):
    """swizzle_chunk(row0 + lr, chunk0 + lc) == swizzle_base(row0, chunk0) + (swizzle_lane(lr, lc) ^ chunk0 % w)."""
    chunks = dp // 8
    w = hd.hd_swizzle_width(chunks)
    for rows in (16, 32, 64, 128):
        for row0 in range(0, rows - 15, 8):
            for chunk0 in range(0, chunks, 2):
                for lane in range(32):
                    for fn in (hd.hd_ldsm_rows_then_chunks, hd.hd_ldsm_chunks_then_rows):
                        lr, lc = _pair(fn, lane)
                        want = hd.hd_swizzle_chunk(row0 + lr, chunk0 + lc, rows, chunks)
                        got = hd.hd_swizzle_base(row0, chunk0, rows, chunks) + (
                            hd.hd_swizzle_lane(lr, lc, chunks) ^ (chunk0 % w))
                        assert got == want


def _copy_tiles(hd):
    """(rows, chunks, threads) of every cp.async tile copy the kernels make."""
    out = set()
    for dp, warps, mt in _configs(hd):
        threads = 32 * warps
        out.add((hd.hd_v2_block_m(warps, mt), dp // 8, threads))
        out.add((hd.hd_v2_block_n(dp, warps), dp // 8, threads))
    return sorted(out)


def test_copy_units_cover_the_tile_conflict_free(hd):
    for rows, chunks, threads in _copy_tiles(hd):
        w = hd.hd_swizzle_width(chunks)
        kr_n = rows * w // threads
        assert rows * w % threads == 0
        seen = set()
        for kb in range(chunks // w):
            for kr in range(kr_n):
                phases = []
                for t in range(threads):
                    r, c = _pair(hd.hd_copy_unit, t, kb, kr, chunks, threads)
                    assert (r, c) == _pair(hd.hd_unit_row_chunk, t + (kb * kr_n + kr) * threads, rows, chunks)
                    p = hd.hd_swizzle_chunk(r, c, rows, chunks)
                    first = _pair(hd.hd_copy_unit, t, 0, 0, chunks, threads)
                    split = kb * rows * w + kr * threads + (
                        hd.hd_swizzle_chunk(*first, rows, chunks) ^ hd.hd_copy_xor(kr, chunks, threads))
                    assert split == p, (rows, chunks, threads, t, kb, kr)
                    seen.add((r, c))
                    phases.append(p)
                for i in range(0, threads, 8):
                    assert conflict_free(phases[i : i + 8])
        assert seen == {(r, c) for r in range(rows) for c in range(chunks)}


def test_epilogue_staging_is_conflict_free(hd):
    """4-byte fragment stores (one per lane: row g / g+8, chunk nd, word t) and the 16-byte read-back phases."""
    for dp, warps, mt in _configs(hd):
        chunks, bm = dp // 8, hd.hd_v2_block_m(warps, mt)
        for w0 in range(0, bm, 16 * mt):
            for m in range(mt):
                for r in range(2):
                    for nd in range(chunks):
                        banks = []
                        for lane in range(32):
                            row = w0 + 16 * m + hd.hd_acc_row(lane, 2 * r)
                            word = hd.hd_swizzle_chunk(row, nd, bm, chunks) * 4 + hd.hd_acc_col(lane, 0) // 2
                            banks.append(word % 32)
                        assert len(set(banks)) == 32
            units = [_pair(hd.hd_unit_row_chunk, u, 16 * mt, chunks) for u in range(16 * mt * chunks)]
            assert sorted(units) == sorted((r, c) for r in range(16 * mt) for c in range(chunks))
            phys = [hd.hd_swizzle_chunk(w0 + r, c, bm, chunks) for r, c in units]
            for i in range(0, len(phys), 8):
                assert conflict_free(phys[i : i + 8])


def test_shared_memory_regions_fit_and_do_not_overlap(hd):
    for dp, warps, mt in _configs(hd):
        bm, bn = hd.hd_v2_block_m(warps, mt), hd.hd_v2_block_n(dp, warps)
        regions = [(0, bm * dp)]
        for stage in range(2):
            regions.append((hd.hd_v2_k_offset(dp, warps, mt, stage), bn * dp))
            regions.append((hd.hd_v2_v_offset(dp, warps, mt, stage), bn * dp))
        regions.sort()
        for (a, n), (b, _) in zip(regions, regions[1:]):
            assert a + n <= b and (2 * b) % 128 == 0  # tiles 128-byte aligned
        end = regions[-1][0] + regions[-1][1]
        assert 2 * end == hd.hd_v2_smem_bytes(dp, warps, mt, 2) <= 227 * 1024
        if hd.hd_v2_smem_bytes(dp, warps, mt, 2) > 163 * 1024:
            pytest.fail(f"dp={dp} tile {warps}x{mt} does not fit sm_80's 163 KB per block")


# ---- tile walk, splits, the host heuristics ----


def test_tile_walk_and_splits_partition_the_keys(hd):
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        lens = [int(x) for x in rng.integers(1, 300, n)]
        bn = int(rng.choice([32, 64]))
        arr = (ctypes.c_int * n)(*lens)
        walk = [(s, n0) for s, ln in enumerate(lens) for n0 in range(0, ln, bn)]
        total = sum(hd.hd_tiles_of(ln, bn) for ln in lens)
        assert total == len(walk)
        n0 = ctypes.c_int()
        for t, want in enumerate(walk):
            assert (hd.hd_locate_tile(arr, n, bn, t, ctypes.byref(n0)), n0.value) == want
        assert hd.hd_locate_tile(arr, n, bn, total, ctypes.byref(n0)) == n
        for splits in range(1, min(total, 16) + 1):
            bounds = [hd.hd_split_begin(total, splits, i) for i in range(splits + 1)]
            assert bounds[0] == 0 and bounds[-1] == total
            assert all(b < c for b, c in zip(bounds, bounds[1:]))  # every split has >= 1 tile


def test_block_coords_roundtrip(hd):
    for m_blocks, splits, bh in ((1, 1, 3), (5, 3, 4), (2, 16, 7)):
        seen = set()
        for block in range(m_blocks * splits * bh):
            out = (ctypes.c_int * 3)()
            hd.hd_block_coords(block, m_blocks, splits, out)
            c = tuple(out)
            assert 0 <= c[0] < bh and 0 <= c[1] < splits and 0 <= c[2] < m_blocks
            assert block == (c[0] * splits + c[1]) * m_blocks + c[2]
            seen.add(c)
        assert len(seen) == m_blocks * splits * bh


def _tile(hd, bh, lq, dp, sms=132):
    return _pair(hd.hd_choose_tile, bh, lq, dp, sms)


def test_heuristics_at_patch_parallel_shapes(hd):
    """SD1.5 on 4 ranks, batch 2 (CFG), 8 heads: per-rank rows 1024/256/64/16 with head dims 40/80/160/160."""
    bh = 16
    assert _tile(hd, bh, 1024, 48) == (4, 2)  # 128 blocks of 128 rows; splits add the rest
    assert _tile(hd, bh, 256, 80) == (4, 1)
    assert _tile(hd, bh, 64, 160) == (4, 1)
    assert _tile(hd, bh, 16, 160) == (1, 1)  # a 64-row tile would be 3/4 empty
    assert _tile(hd, bh, 512, 64) == (4, 1)  # 64 blocks of 128 rows would leave half the SMs without one
    assert _tile(hd, bh, 4096, 256) == (4, 1)
    assert _tile(hd, bh, 8, 256) == (4, 1)  # no 16-row tile above head dim 160
    for dp in PADDED_DIMS:
        for lq in (1, 16, 17, 64, 128, 1000, 4096):
            for bhx in (1, 16, 640):
                w, mt = _tile(hd, bhx, lq, dp)
                assert hd.hd_v2_tile_supported(dp, w, mt)
    # splits: 1 when the grid is full; otherwise <= tiles / 2 and <= kMaxSplits, aiming at ~2 blocks per SM
    assert hd.hd_choose_splits(264, 64, 132) == 1
    assert hd.hd_choose_splits(16, 3, 132) == 1
    for blocks in (1, 8, 16, 64, 131):
        for tiles in (4, 16, 64, 1000):
            s = hd.hd_choose_splits(blocks, tiles, 132)
            assert 1 <= s <= min(hd.hd_max_splits(), tiles // 2)
            assert s == min(math.ceil(264 / blocks), tiles // 2, hd.hd_max_splits())


def test_parameter_block(hd):
    """64 segments ride in a __grid_constant__ parameter block: > 4 KB (CUDA >= 12.1), < 32,764 bytes."""
    from halodiff import ops

    assert hd.hd_max_segments() == ops._CUDA_ATTENTION_MAX_SEGMENTS
    assert 4096 < hd.hd_params_bytes() <= 32764


# ---- the kernel's arithmetic, block by block, in numpy ----


def emulate_v2(hd, q, ks, vs, scale, bn, splits):
    """Per split: online softmax over its tiles in base 2 (the kernel's m/l/alpha updates, fp64 here), O / l and
    lse = m + log2 l; then the merge kernel's combination. q [Lq, D]; ks/vs lists of [L_i, D]."""
    lens = [k.shape[0] for k in ks]
    arr = (ctypes.c_int * len(lens))(*lens)
    total = sum(hd.hd_tiles_of(n, bn) for n in lens)
    sl2 = scale * math.log2(math.e)
    parts, lses = [], []
    for split in range(splits):
        t0, t1 = hd.hd_split_begin(total, splits, split), hd.hd_split_begin(total, splits, split + 1)
        m = np.full(q.shape[0], -np.inf)
        l = np.zeros(q.shape[0])
        o = np.zeros_like(q)
        n0 = ctypes.c_int()
        for t in range(t0, t1):
            s = hd.hd_locate_tile(arr, len(lens), bn, t, ctypes.byref(n0))
            k, v = ks[s][n0.value : n0.value + bn], vs[s][n0.value : n0.value + bn]
            sc = q @ k.T
            m_new = np.maximum(m, sc.max(1) * sl2)
            alpha = np.exp2(m - m_new)
            p = np.exp2(sc * sl2 - m_new[:, None])
            l = l * alpha + p.sum(1)
            o = o * alpha[:, None] + p @ v
            m = m_new
        parts.append(o / l[:, None])
        lses.append(m + np.log2(l))
    lse = np.stack(lses)
    w = np.exp2(lse - lse.max(0))
    return (w[:, :, None] * np.stack(parts)).sum(0) / w.sum(0)[:, None]


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_split_kv_with_lse_merge_equals_attention(hd, splits):
    rng = np.random.default_rng(splits)
    d, lq = 40, 19
    lens = [33, 1, 64, 70, 5]
    q = rng.standard_normal((lq, d)) * 3
    ks = [rng.standard_normal((n, d)) for n in lens]
    vs = [rng.standard_normal((n, d)) for n in lens]
    scale = 1 / math.sqrt(d)
    k, v = np.concatenate(ks), np.concatenate(vs)
    s = q @ k.T * scale
    p = np.exp(s - s.max(1, keepdims=True))
    want = (p / p.sum(1, keepdims=True)) @ v
    got = emulate_v2(hd, q, ks, vs, scale, 32, splits)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

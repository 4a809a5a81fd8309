// Index, tiling, swizzle and scheduling math of the segmented-attention CUDA kernels, as plain
// integer functions that compile for the device (nvcc) and for the host (any C++17 compiler, no CUDA
// headers): the kernels and the host launcher call them, and tests/test_attention_lanes.py checks
// them against a numpy lane model of the PTX ISA tables through a small ctypes shim
// (bench/kernel_audit.py builds it). Nothing here touches memory.
//
// Conventions. Shared-memory tiles hold 16-bit elements (fp16/bf16) in 16-byte chunks of 8; a tile of
// `rows` x `chunks` chunks (row = a query or key, chunk = 8 head-dim columns) is stored swizzled
// (swizzle_chunk). mma.m16n8k16 fragments: lane = 4 * g + t (g = groupID, t = threadID_in_group).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define HALODIFF_HD __host__ __device__ __forceinline__
#else
#define HALODIFF_HD inline
#endif

namespace halodiff::attn {

constexpr int kMaxSegments = 64;  // non-empty K/V segments in one launch (parameter block: see AttnParams)
constexpr int kMaxHeadDim = 256;
constexpr int kMaxSplits = 16;    // K/V splits of one query tile (v2; partials merged by a second kernel)

// ---- kernel parameter block ----
struct SegmentParam {
  const void* k;
  const void* v;
  int64_t k_stride_b, k_stride_h, k_stride_l;  // in elements
  int64_t v_stride_b, v_stride_h, v_stride_l;
};

// Passed by value as a __grid_constant__ kernel parameter (no host-to-device copy, graph-capture safe).
// With kMaxSegments = 64 it is ~4.6 KB: kernel parameters above 4 KB need CUDA >= 12.1 (nvcc and driver
// r530+; up to 32,764 bytes on Volta and newer). setup.py refuses older toolkits; the .cu static_asserts.
struct AttnParams {
  const void* q;
  void* out;
  float* o_part;  // v2 with splits > 1: [splits, B*H*Lq, DP] fp32 partial outputs (each normalised by its own sum)
  float* lse;     // v2 with splits > 1: [splits, B*H*Lq] log2-sum-exp2 of each partial, in scaled (base-2) units
  int64_t q_stride_b, q_stride_h, q_stride_l;  // in elements
  int64_t o_stride_b, o_stride_h, o_stride_l;
  int32_t heads, lq, d, n_segs, m_blocks;
  int32_t splits;       // v2: K/V splits per query tile (1 = write the output directly)
  int32_t total_tiles;  // v2: sum over segments of ceil(len / BN) for the launched kernel's BN
  float scale_log2;     // scale * log2(e): scores are kept in base-2 units, softmax uses exp2
  bool vec16;           // every q/K/V row start is 16-byte aligned: 16-byte (cp.async) loads
  bool out_vec16;       // every output row start is 16-byte aligned: 16-byte stores
  int32_t len[kMaxSegments];
  SegmentParam seg[kMaxSegments];
};

// ---- head dims and tile shapes ----
// Padded head dim the kernels are instantiated for: next multiple of 16 up to 128, of 32 above.
HALODIFF_HD constexpr int padded_head_dim(int d) { return d <= 128 ? (d + 15) / 16 * 16 : (d + 31) / 32 * 32; }

// v1 (kept selectable): 64 query rows, K/V tiles of 64 rows (32 above head dim 128), row pitch DP + 8.
HALODIFF_HD constexpr int v1_block_n(int dp) { return dp <= 128 ? 64 : 32; }
HALODIFF_HD constexpr int v1_mma_smem_bytes(int dp, int elem) { return (64 + 2 * v1_block_n(dp)) * (dp + 8) * elem; }
// fp32 SIMT kernel (v1 and v2): Q [32][DP+1], K [BN][DP+1], V [BN][DP], P [32][BN+1] floats.
HALODIFF_HD constexpr int simt_smem_bytes(int dp) {
  return (32 * (dp + 1) + v1_block_n(dp) * (dp + 1) + v1_block_n(dp) * dp + 32 * (v1_block_n(dp) + 1)) * 4;
}

// v2 tiles: `warps` warps, each owning `mt` m-tiles of 16 query rows (BM = 16 * warps * mt rows per block:
// 128 = 4 warps x 2 m-tiles for head dims <= 64, the flash-attention-2 shape where each K/V fragment feeds
// 2 mma; 64 = 4 x 1; 16 = 1 x 1, the short-query tile), K/V tiles of v2_block_n rows double-buffered
// (cp.async), all tiles swizzled without padding. Shared memory: Q [BM][DP], then per stage K [BN][DP], V [BN][DP].
HALODIFF_HD constexpr int v2_block_m(int warps, int mt) { return 16 * warps * mt; }
// K/V rows per tile: 64, or 32 for wide heads (and for the 1-warp tile above head dim 64, whose single warp
// copies every tile).
HALODIFF_HD constexpr int v2_block_n(int dp, int warps) { return dp <= (warps == 1 ? 64 : 128) ? 64 : 32; }
// Instantiated tiles: 128 rows for head dims <= 64, 16 rows for head dims <= 160 (beyond, its single warp
// would spill), 64 rows for all.
HALODIFF_HD constexpr bool v2_tile_supported(int dp, int warps, int mt) {
  return (warps == 4 && mt == 1) || (warps == 4 && mt == 2 && dp <= 64) || (warps == 1 && mt == 1 && dp <= 160);
}
// Q fragments stay in registers (else they are re-read from shared memory every K/V tile).
HALODIFF_HD constexpr bool v2_q_in_regs(int dp, int mt) { return mt == 1 ? dp <= 128 : dp <= 64; }
constexpr int kV2Stages = 2;
HALODIFF_HD constexpr int v2_k_offset(int dp, int warps, int mt, int stage) {  // in elements
  return v2_block_m(warps, mt) * dp + stage * 2 * v2_block_n(dp, warps) * dp;
}
HALODIFF_HD constexpr int v2_v_offset(int dp, int warps, int mt, int stage) {
  return v2_k_offset(dp, warps, mt, stage) + v2_block_n(dp, warps) * dp;
}
HALODIFF_HD constexpr int v2_smem_bytes(int dp, int warps, int mt, int elem) {
  return (v2_block_m(warps, mt) + 2 * kV2Stages * v2_block_n(dp, warps)) * dp * elem;
}

// ---- swizzled shared-memory tiles ----
// A tile row of `chunks` 16-byte chunks is cut into column blocks of w = swizzle_width(chunks) chunks
// (8, 4, 2 or 1: the largest power of two <= 8 dividing chunks); each column block is stored as its own
// [rows][w] array, and the chunk index inside a block is XORed with the row's 128-byte-line index
// (8 / w rows share one 128-byte line). Then any 8 consecutive rows (aligned to 8) of one logical chunk
// (one ldmatrix 8x8 matrix) fall in 8 distinct 16-byte bank groups, and so do 8 consecutive copy units
// (unit_row_chunk): neither the ldmatrix phases nor the cp.async stores conflict. No padding, any
// head dim that is a multiple of 16 (40 -> 48, 80, 160 ...).
HALODIFF_HD constexpr int swizzle_width(int chunks) {
  return chunks % 8 == 0 ? 8 : chunks % 4 == 0 ? 4 : chunks % 2 == 0 ? 2 : 1;
}
// Physical chunk index (0 .. rows * chunks - 1) of logical (row, chunk); rows must be a multiple of 8.
HALODIFF_HD constexpr int swizzle_chunk(int row, int chunk, int rows, int chunks) {
  const int w = swizzle_width(chunks);
  const int block = chunk / w, within = chunk % w;
  return block * rows * w + row * w + (within ^ ((row / (8 / w)) % w));
}

struct RowChunk {
  int row, chunk;
};
// The u-th chunk copied into a tile: the w chunks of one row's column block are consecutive units, then
// the next row, then the next column block. So 8 consecutive units read w * 16 contiguous bytes from each
// of 8 / w rows (whole 32-byte sectors for w >= 2) and store to 8 distinct bank groups.
HALODIFF_HD constexpr RowChunk unit_row_chunk(int u, int rows, int chunks) {
  const int w = swizzle_width(chunks);
  const int block = u / (rows * w), within = u % (rows * w);
  return {within / w, block * w + within % w};
}
// The same units as a `threads`-thread copy walks them (threads dividing rows * w): thread t copies unit
// t + (kb * (rows * w / threads) + kr) * threads, i.e. row t / w + kr * (threads / w) of column block kb,
// chunk t % w inside it. Its physical chunk is a compile-time offset plus the thread's first one XOR a
// compile-time constant (threads 32 or 128, rows a multiple of 8):
//   swizzle_chunk(copy_unit(t, kb, kr))
//       == kb * rows * w + kr * threads + (swizzle_chunk(copy_unit(t, 0, 0)) ^ copy_xor(kr))
HALODIFF_HD constexpr RowChunk copy_unit(int t, int kb, int kr, int chunks, int threads) {
  const int w = swizzle_width(chunks);
  return {t / w + kr * (threads / w), kb * w + t % w};
}
HALODIFF_HD constexpr int copy_xor(int kr, int chunks, int threads) { return kr * threads / 8 % swizzle_width(chunks); }

// Splitting swizzle_chunk for ldmatrix addresses: for row0 % 8 == 0, an even chunk0 (w >= 2) and a lane's
// offsets lr >= 0, lc in {0, 1}:
//   swizzle_chunk(row0 + lr, chunk0 + lc) == swizzle_base(row0, chunk0) + (swizzle_lane(lr, lc) ^ (chunk0 % w))
// so each address is a per-lane register XOR a compile-time constant plus a compile-time offset.
HALODIFF_HD constexpr int swizzle_base(int row0, int chunk0, int rows, int chunks) {
  const int w = swizzle_width(chunks);
  return chunk0 / w * rows * w + row0 * w;
}
HALODIFF_HD constexpr int swizzle_lane(int lr, int lc, int chunks) {
  const int w = swizzle_width(chunks);
  return lr * w + (lc ^ ((lr / (8 / w)) % w));
}

// ---- ldmatrix.x4 address maps (lane l supplies row l % 8 of matrix l / 8) ----
// Matrices (rows 0-7, chunk 0), (rows 8-15, chunk 0), (rows 0-7, chunk 1), (rows 8-15, chunk 1) of a
// 16-row, 2-chunk window: the A operand of mma.m16n8k16 from a [row][k] tile (Q), and with .trans the
// B operands of two n-tiles from a [k][n] tile (V: registers {0, 1} = n-tile 0, {2, 3} = n-tile 1).
HALODIFF_HD constexpr RowChunk ldsm_rows_then_chunks(int lane) { return {lane & 15, lane >> 4}; }
// Matrices (rows 0-7, chunk 0), (rows 0-7, chunk 1), (rows 8-15, chunk 0), (rows 8-15, chunk 1): without
// .trans, the B operands of two n-tiles from an [n][k] tile (K: registers {0, 1} = keys 0-7, {2, 3} = 8-15).
HALODIFF_HD constexpr RowChunk ldsm_chunks_then_rows(int lane) {
  return {(lane & 7) | ((lane >> 4) << 3), (lane >> 3) & 1};
}

// ---- mma.m16n8k16 accumulator fragment (c0..c3 of lane) ----
HALODIFF_HD constexpr int acc_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
HALODIFF_HD constexpr int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }
// P = softmax(S) re-used as the A operand of P.V without leaving registers: half `half` of A register
// `reg` for key chunk c (keys 16c..16c+15) is accumulator element acc_as_a_elem(reg, half) of S n-tile
// 2c + acc_as_a_tile(reg): reg 0 = tile 2c {c0, c1}, reg 1 = tile 2c {c2, c3}, reg 2 = tile 2c+1 {c0, c1},
// reg 3 = tile 2c+1 {c2, c3}.
HALODIFF_HD constexpr int acc_as_a_tile(int reg) { return reg >> 1; }
HALODIFF_HD constexpr int acc_as_a_elem(int reg, int half) { return 2 * (reg & 1) + half; }

// ---- K/V tiles over segments, splits ----
HALODIFF_HD constexpr int tiles_of(int len, int bn) { return (len + bn - 1) / bn; }
// Tiles [split_begin(i), split_begin(i + 1)) of `total` belong to split i (non-empty when splits <= total).
HALODIFF_HD constexpr int split_begin(int total, int splits, int i) {
  return static_cast<int>(static_cast<int64_t>(total) * i / splits);
}
// Segment holding global tile t (tiles numbered segment after segment) and the tile's first row in it;
// returns n_segs when t is past the last tile.
HALODIFF_HD int locate_tile(const int32_t* len, int n_segs, int bn, int t, int* n0) {
  int s = 0;
  for (; s < n_segs; ++s) {
    const int n = tiles_of(len[s], bn);
    if (t < n) break;
    t -= n;
  }
  *n0 = t * bn;
  return s;
}
// Block index -> (bh, split, m-block): m fastest, so blocks that share K/V tiles run side by side.
struct BlockCoords {
  int bh, split, m;
};
HALODIFF_HD constexpr BlockCoords block_coords(int block, int m_blocks, int splits) {
  return {block / m_blocks / splits, block / m_blocks % splits, block % m_blocks};
}

// ---- host heuristics (v2) ----
struct Tile {
  int warps, mt;
};
// The query tile for B*H heads of lq rows on `sms` SMs. Per-rank query lengths of a patch-parallel UNet are
// small (SD1.5 on 4 ranks: 1024/256/64/16 rows per head), so: the short-query tile (1 warp, 16 rows) when
// a 64-row tile would be at least half empty; the 128-row tile (head dims <= 64) when its blocks alone fill
// half the SMs; else 64 rows. K/V splits (choose_splits) then fill the GPU.
inline Tile choose_tile(int64_t bh, int64_t lq, int dp, int sms) {
  if (lq <= 32 && v2_tile_supported(dp, 1, 1)) return {1, 1};
  if (lq >= 128 && v2_tile_supported(dp, 4, 2) && 2 * bh * ((lq + 127) / 128) >= sms) return {4, 2};
  return {4, 1};
}
// K/V splits so that about 2 blocks per SM are in flight, each split >= 2 tiles, at most kMaxSplits.
inline int choose_splits(int64_t blocks, int total_tiles, int sms) {
  if (blocks <= 0 || total_tiles < 4 || blocks >= sms) return 1;
  int64_t s = (2 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
  if (s > total_tiles / 2) s = total_tiles / 2;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

}  // namespace halodiff::attn

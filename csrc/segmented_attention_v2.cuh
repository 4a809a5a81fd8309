// Segmented attention v2 (fp16/bf16, sm_80+): a flash-attention-2-class forward over K/V segments.
//
// Block = WARPS warps x MT m-tiles of 16 query rows (128 = 4 x 2, 64 = 4 x 1, the short-query tile
// 16 = 1 x 1) x one (b, h) x one K/V split. Per K/V tile of BN keys each warp computes S = Q.K^T
// (mma.m16n8k16, fp32 accumulation), the online softmax in registers (base 2, one MUFU.EX2 per score),
// and O += P.V with P re-packed in registers as the A operand. Operands come from swizzled shared memory
// with ldmatrix.x4 (K plain, V .trans; each fragment feeds MT mma; Q once into registers where they fit,
// else per tile). K/V tiles are copied with 16-byte cp.async (zero fill for ragged rows/columns) into two
// stages, so the copy of tile i+1 overlaps the math of tile i. The output is staged through shared
// memory (the warp's own Q rows) and written with 16-byte stores.
//
// Split over K/V (splits > 1, for grids that would leave SMs idle): split i takes the tiles
// [split_begin(i), split_begin(i+1)) of the concatenated segments and writes its normalised fp32
// partial output and its log2-sum-exp2; seg_attn_merge_kernel combines them:
//   O = sum_i 2^(lse_i - lse) O_i,  lse = log2 sum_i 2^lse_i.
// Reads per block: its Q rows once, each K/V row of its split once. Writes: its O rows once.
#pragma once
#include <cmath>
#include <cstdint>

#include "attention_layout.cuh"
#include "attention_mma.cuh"

namespace halodiff::attn {

template <int DP, int WARPS, int MT>
struct V2Config {
  static constexpr int kThreads = 32 * WARPS;
  static constexpr int BM = v2_block_m(WARPS, MT);
  static constexpr int BN = v2_block_n(DP, WARPS);
  static constexpr int C = DP / 8;    // 16-byte chunks per row
  static constexpr int KT = DP / 16;  // k-steps of Q.K^T
  static constexpr int NT = BN / 8;   // S n-tiles (8 keys) per m-tile
  static constexpr int OT = DP / 8;   // O n-tiles (8 head-dim columns) per m-tile
  static constexpr bool kQInRegs = v2_q_in_regs(DP, MT);
  static constexpr int kSmemBytes = v2_smem_bytes(DP, WARPS, MT, 2);
  static_assert(v2_tile_supported(DP, WARPS, MT), "unsupported v2 tile");
  static_assert(DP % 16 == 0 && BN % 16 == 0, "tiles are whole mma steps");
};

// Copies a ROWS x (C * 8) tile of 16-bit elements into the swizzled shared tile at dst with 16-byte
// cp.async (the caller commits the group): row r, column c comes from src[r * ld + c] when r < rows_valid
// and c < d, else 0 (zero fill: padding must not hold stale data, 0 * NaN would poison the dot products).
// Every row start must be 16-byte aligned (the host re-lays other inputs).
template <int ROWS, int C, int THREADS>
__device__ __forceinline__ void copy_tile(uint32_t dst, const uint16_t* src, int64_t ld, int rows_valid, int d) {
  constexpr int W = swizzle_width(C), RS = THREADS / W, KR = ROWS * W / THREADS;
  static_assert(W >= 2 && (ROWS * W) % THREADS == 0, "copy units must tile the threads");
  const int t = threadIdx.x;
  const RowChunk first = copy_unit(t, 0, 0, C, THREADS);
  const uint16_t* thread_src = src + first.row * ld + first.chunk * 8;
  const int thread_phys = swizzle_chunk(first.row, first.chunk, ROWS, C);
#pragma unroll
  for (int kb = 0; kb < C / W; ++kb) {
    const int col = (kb * W + first.chunk) * 8;
    const int n_col = min(max(d - col, 0), 8);
#pragma unroll
    for (int kr = 0; kr < KR; ++kr) {
      const int phys = kb * ROWS * W + kr * THREADS + (thread_phys ^ copy_xor(kr, C, THREADS));
      const int n = first.row + kr * RS < rows_valid ? n_col : 0;
      cp_async16(dst + 16u * phys, n > 0 ? thread_src + kr * RS * ld + kb * W * 8 : src, 2 * n);
    }
  }
}

// acc[mt][n0] += a[mt] . B and acc[mt][n0 + 1] += a[mt] . B' for every m-tile, with the B fragments of two
// n-tiles from one ldmatrix.x4 (.trans for V) at addr: each fragment feeds MT mma.
template <typename T, bool TRANS, int MT, int N>
__device__ __forceinline__ void mma_b_pair(float (&acc)[MT][N][4], int n0, const uint32_t (&a)[MT][4],
                                           uint32_t addr) {
  uint32_t b[4];
  ldsm_x4<TRANS>(b, addr);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    mma16816<T>(acc[mt][n0], a[mt], b[0], b[1]);
    mma16816<T>(acc[mt][n0 + 1], a[mt], b[2], b[3]);
  }
}

template <typename T, int DP, int WARPS, int MT>
__global__ void __launch_bounds__(32 * WARPS, 1) seg_attn_v2_kernel(const __grid_constant__ AttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel only on sm_80+
#else
  using Cfg = V2Config<DP, WARPS, MT>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, C = Cfg::C, KT = Cfg::KT, NT = Cfg::NT, OT = Cfg::OT;
  constexpr int THREADS = Cfg::kThreads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t sm_base = smem_addr(smem_raw);  // Q tile at 0, then the K/V stages (attention_layout.cuh)

  const BlockCoords bc = block_coords(blockIdx.x, p.m_blocks, p.splits);
  const int b = bc.bh / p.heads, h = bc.bh % p.heads, m0 = bc.m * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w0 = warp * 16 * MT;                     // this warp's first row in the tile
  const bool warp_active = m0 + w0 < p.lq;           // warp-uniform: a warp without query rows skips the math

  const int t_begin = split_begin(p.total_tiles, p.splits, bc.split);
  const int n_tiles = split_begin(p.total_tiles, p.splits, bc.split + 1) - t_begin;
  int seg_n0;
  int seg = locate_tile(p.len, p.n_segs, BN, t_begin, &seg_n0);

  auto load_kv = [&](int stage, int s, int n0) {
    const SegmentParam& sp = p.seg[s];
    const int rows = p.len[s] - n0;
    const uint16_t* kb = static_cast<const uint16_t*>(sp.k) + b * sp.k_stride_b + h * sp.k_stride_h +
                         static_cast<int64_t>(n0) * sp.k_stride_l;
    const uint16_t* vb = static_cast<const uint16_t*>(sp.v) + b * sp.v_stride_b + h * sp.v_stride_h +
                         static_cast<int64_t>(n0) * sp.v_stride_l;
    copy_tile<BN, C, THREADS>(sm_base + 2u * v2_k_offset(DP, WARPS, MT, stage), kb, sp.k_stride_l, rows, p.d);
    copy_tile<BN, C, THREADS>(sm_base + 2u * v2_v_offset(DP, WARPS, MT, stage), vb, sp.v_stride_l, rows, p.d);
  };

  // Group 0: the Q tile; group 1: the first K/V tile.
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h +
                      static_cast<int64_t>(m0) * p.q_stride_l;
  copy_tile<BM, C, THREADS>(sm_base, q, p.q_stride_l, p.lq - m0, p.d);
  cp_async_commit();
  load_kv(0, seg, seg_n0);
  cp_async_commit();

  // This lane's ldmatrix address parts: swizzle_chunk(row0 + lr, chunk0 + lc) = swizzle_base(row0, chunk0)
  // + (lane part ^ chunk0 % W), compile-time except the lane part (attention_layout.cuh).
  constexpr int W = swizzle_width(C);
  const RowChunk la = ldsm_rows_then_chunks(lane);  // Q (A operand) and V (.trans B operands)
  const RowChunk lb = ldsm_chunks_then_rows(lane);  // K (B operands)
  const int lane_a = swizzle_lane(la.row, la.chunk, C), lane_b = swizzle_lane(lb.row, lb.chunk, C);
  auto ldsm_addr = [&](uint32_t tile, int rows, int row0, int chunk0, int lane_part) {
    return tile + 16u * (swizzle_base(row0, chunk0, rows, C) + (lane_part ^ (chunk0 % W)));
  };
  auto q_frag = [&](uint32_t (&a)[4], int mt, int kk) {
    ldsm_x4(a, ldsm_addr(sm_base, BM, w0 + mt * 16, 2 * kk, lane_a));
  };
  uint32_t qf[MT][Cfg::kQInRegs ? KT : 1][4];
  if constexpr (Cfg::kQInRegs) {
    cp_async_wait<1>();  // Q has landed (the K/V tile may still be in flight)
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) q_frag(qf[mt][kk], mt, kk);
    }
  }

  float o[MT][OT][4] = {};
  float m_run[MT][2], l_run[MT][2];  // running max (base 2) and sum of rows acc_row(lane, 0 | 2)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }
  const float sl2 = p.scale_log2;

  for (int i = 0; i < n_tiles; ++i) {
    const int stage = i & 1;
    int next_seg = seg, next_n0 = seg_n0 + BN;
    if (next_n0 >= p.len[seg]) {  // segments are non-empty: the next tile starts the next segment
      ++next_seg;
      next_n0 = 0;
    }
    if (i + 1 < n_tiles) load_kv(stage ^ 1, next_seg, next_n0);
    cp_async_commit();   // possibly empty: one group per tile
    cp_async_wait<1>();  // this tile's group is complete (for this thread) ...
    __syncthreads();     // ... and for every thread

    if (warp_active) {
      const uint32_t k_base = sm_base + 2u * v2_k_offset(DP, WARPS, MT, stage);
      const uint32_t v_base = sm_base + 2u * v2_v_offset(DP, WARPS, MT, stage);
      // S[16 x BN] = Q[16 x DP] . K[BN x DP]^T per m-tile; each K fragment feeds MT mma.
      float s[MT][NT][4] = {};
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (Cfg::kQInRegs) {
#pragma unroll
            for (int r = 0; r < 4; ++r) a[mt][r] = qf[mt][kk][r];
          } else {
            q_frag(a[mt], mt, kk);
          }
        }
#pragma unroll
        for (int jp = 0; jp < NT / 2; ++jp) {
          mma_b_pair<T, false>(s, 2 * jp, a, ldsm_addr(k_base, BN, jp * 16, 2 * kk, lane_b));
        }
      }

      // Online softmax: element e of n-tile j is row acc_row(lane, e), key j * 8 + acc_col(lane, e); the 4
      // lanes of a group share rows, so row reductions are two xor-shuffles.
      const int valid = p.len[seg] - seg_n0;  // keys in this tile (>= 1)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (valid < BN) {
#pragma unroll
          for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (j * 8 + acc_col(lane, e) >= valid) s[mt][j][e] = -INFINITY;
            }
          }
        }
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][j][e]);
        }
        float mref[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
          const float m_new = fmaxf(m_run[mt][r], mx[r] * sl2);
          mref[r] = m_new == -INFINITY ? 0.f : m_new;
          alpha[r] = fast_exp2(m_run[mt][r] - mref[r]);
          m_run[mt][r] = m_new;
        }
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][j][e] = fast_exp2(fmaf(s[mt][j][e], sl2, -mref[e >> 1]));
            rs[e >> 1] += s[mt][j][e];
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) l_run[mt][r] = l_run[mt][r] * alpha[r] + rs[r];
#pragma unroll
        for (int nd = 0; nd < OT; ++nd) {
#pragma unroll
          for (int e = 0; e < 4; ++e) o[mt][nd][e] *= alpha[e >> 1];
        }
      }

      // O[16 x DP] += P[16 x BN] . V[BN x DP] per m-tile: the accumulators of S n-tiles 2c, 2c+1 are the A
      // operand of key chunk c; each V fragment feeds MT mma.
#pragma unroll
      for (int c = 0; c < BN / 16; ++c) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const float* src = s[mt][2 * c + acc_as_a_tile(r)];
            a[mt][r] = pack2<T>(src[acc_as_a_elem(r, 0)], src[acc_as_a_elem(r, 1)]);
          }
        }
#pragma unroll
        for (int np = 0; np < OT / 2; ++np) {
          mma_b_pair<T, true>(o, 2 * np, a, ldsm_addr(v_base, BN, c * 16, 2 * np, lane_a));
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    seg = next_seg;
    seg_n0 = next_n0;
  }
  cp_async_wait<0>();
  if (!warp_active) return;

  float inv[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      l_run[mt][r] = l;
      inv[mt][r] = l > 0.f ? 1.f / l : 0.f;
    }
  }
  if (p.splits > 1) {
    // Partial result of this split: O / l (fp32, 8-byte stores) and log2(l) + max per row.
    const int64_t bh_total = gridDim.x / (static_cast<int64_t>(p.m_blocks) * p.splits);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + w0 + mt * 16 + acc_row(lane, 2 * r);
        if (row >= p.lq) continue;
        const int64_t idx = (bc.split * bh_total + bc.bh) * p.lq + row;
        float* op = p.o_part + idx * DP + acc_col(lane, 0);
#pragma unroll
        for (int nd = 0; nd < OT; ++nd) {
          *reinterpret_cast<float2*>(op + nd * 8) =
              make_float2(o[mt][nd][2 * r] * inv[mt][r], o[mt][nd][2 * r + 1] * inv[mt][r]);
        }
        if ((lane & 3) == 0) p.lse[idx] = l_run[mt][r] > 0.f ? m_run[mt][r] + log2f(l_run[mt][r]) : -INFINITY;
      }
    }
    return;
  }

  // Normalise, stage the warp's rows in its own rows of the Q tile (only this warp read them), then write
  // whole 16-byte chunks of each row.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = w0 + mt * 16 + acc_row(lane, 2 * r);
#pragma unroll
      for (int nd = 0; nd < OT; ++nd) {
        st_shared_b32(sm_base + 16u * swizzle_chunk(row, nd, BM, C) + 2u * acc_col(lane, 0),
                      pack2<T>(o[mt][nd][2 * r] * inv[mt][r], o[mt][nd][2 * r + 1] * inv[mt][r]));
      }
    }
  }
  __syncwarp();
  constexpr int kUnits = 16 * MT * C;
  uint16_t* out = static_cast<uint16_t*>(p.out) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int k = 0; k < (kUnits + 31) / 32; ++k) {
    const int u = lane + 32 * k;
    if (kUnits % 32 != 0 && u >= kUnits) break;
    const RowChunk rc = unit_row_chunk(u, 16 * MT, C);
    const int row = m0 + w0 + rc.row, col = rc.chunk * 8;
    if (row >= p.lq || col >= p.d) continue;
    const uint4 v = ld_shared_v4(sm_base + 16u * swizzle_chunk(w0 + rc.row, rc.chunk, BM, C));
    uint16_t* dst = out + static_cast<int64_t>(row) * p.o_stride_l + col;
    if (p.out_vec16 && col + 8 <= p.d) {
      st_global_v4(dst, v);
    } else {
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (col + j < p.d) dst[j] = static_cast<uint16_t>(w[j / 2] >> (16 * (j % 2)));
      }
    }
  }
#endif
}

// Combines the splits' partial outputs: thread = (row, 8-column chunk) of the [B*H*Lq, d] output.
struct MergeParams {
  const float* o_part;  // [splits, rows, dp]
  const float* lse;     // [splits, rows]
  void* out;
  int64_t o_stride_b, o_stride_h, o_stride_l;
  int64_t rows;  // B * H * Lq
  int32_t heads, lq, d, dp, splits;
  bool out_vec16;
};

template <typename T>
__global__ void __launch_bounds__(256) seg_attn_merge_kernel(const __grid_constant__ MergeParams p) {
  const int chunks = (p.d + 7) / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.rows * chunks) return;
  const int64_t row = i / chunks;
  const int col = static_cast<int>(i % chunks) * 8;
  float mx = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.lse[s * p.rows + row]);
  float acc[8] = {};
  float wsum = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const float w = exp2f(p.lse[s * p.rows + row] - mx);
      const float4* src = reinterpret_cast<const float4*>(p.o_part + (s * p.rows + row) * p.dp + col);
      const float4 x = src[0], y = src[1];
      wsum += w;
      acc[0] += w * x.x, acc[1] += w * x.y, acc[2] += w * x.z, acc[3] += w * x.w;
      acc[4] += w * y.x, acc[5] += w * y.y, acc[6] += w * y.z, acc[7] += w * y.w;
    }
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  const int64_t bh = row / p.lq;
  const int64_t l = row % p.lq;
  T* dst = static_cast<T*>(p.out) + (bh / p.heads) * p.o_stride_b + (bh % p.heads) * p.o_stride_h +
           l * p.o_stride_l + col;
  if (p.out_vec16 && col + 8 <= p.d) {
    uint4 v;
    v.x = pack2<T>(acc[0] * inv, acc[1] * inv);
    v.y = pack2<T>(acc[2] * inv, acc[3] * inv);
    v.z = pack2<T>(acc[4] * inv, acc[5] * inv);
    v.w = pack2<T>(acc[6] * inv, acc[7] * inv);
    st_global_v4(dst, v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (col + j < p.d) dst[j] = from_float<T>(acc[j] * inv);
    }
  }
}

}  // namespace halodiff::attn

// CUDA kernels for halodiff::segmented_attention: softmax(q·Kᵀ·scale)·V where K/V are given as a list
// of segments along the sequence dim. One online-softmax pass (flash-attention forward) walks the
// segments tile by tile, so the concatenated K/V never exists. The segment table (pointers, lengths,
// strides of up to kMaxSegments non-empty segments) is a __grid_constant__ kernel parameter, so there is
// no host-to-device copy (and the launch is CUDA-graph capturable).
//
// fp16/bf16 (sm_80+), two kernels; HALODIFF_ATTENTION_KERNEL=v1|v2 (read once, default v2) picks one:
//   v2 (segmented_attention_v2.cuh): flash-attention-2 class - ldmatrix from swizzled shared memory,
//     cp.async double-buffered K/V, 128/64/16-row query tiles, K/V splits with a log-sum-exp merge kernel
//     for grids that would leave SMs idle, 16-byte output stores. Validated statically (bench/kernel_audit.py,
//     tests/test_attention_lanes.py); the GPU tests are tests/test_segmented_attention_cuda.py.
//   v1 (below, the previous kernel, kept selectable until a GPU run has validated v2): 128 threads, 4 warps
//     x 16 query rows, mma.sync m16n8k16 with operands read by scalar shared loads, synchronous K/V tiles.
// fp32 (both): exact fp32 FMAs (no TF32), 32 query rows per block, 4x4 S micro-tiles per thread, P staged
//   in shared memory for P·V.
// Every block reads its Q tile once, each K/V row of its (b, h) (and split) once, and writes its O tile
// once. Head dims 1..256 (kMaxHeadDim): kernels are instantiated for padded dims DP (next multiple of 16 up
// to 128, of 32 above); padding columns are zero in shared memory and never stored. Any B/H/L strides are
// supported; the last dim must be dense (the Python layer makes other layouts contiguous).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "attention_layout.cuh"
#include "attention_mma.cuh"
#include "halodiff.h"
#include "segmented_attention_v2.cuh"

namespace halodiff {
namespace {

// ---- device code (v1; AttnParams and the warp primitives are shared with v2) ----
using attn::AttnParams;
using attn::SegmentParam;
using attn::from_float;
using attn::kMaxHeadDim;
using attn::kMaxSegments;
using attn::mma16816;
using attn::pack2;
using attn::to_float;
constexpr int kThreads = 128;

#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__) < 1201
static_assert(sizeof(AttnParams) <= 4096, "kernel parameter blocks > 4 KB need CUDA >= 12.1: lower kMaxSegments");
#endif
static_assert(sizeof(AttnParams) <= 32764, "kernel parameter block above CUDA's 32,764-byte limit");

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Copies a ROWS x DP tile into shared memory dst[ROWS][LDS] (as S): row r, column c comes from
// src[r * ld + c] when r < rows_valid and c < d, and is 0 otherwise (padding rows/columns must be
// zeros, not stale data: 0 * NaN would poison the dot products). Reads each valid element once.
template <typename T, typename S, int ROWS, int DP, int LDS>
__device__ __forceinline__ void load_tile(S* __restrict__ dst, const T* __restrict__ src, int64_t ld,
                                          int rows_valid, int d, bool vec16) {
  if (vec16) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    constexpr int kUnits = DP / kVec;
    for (int u = threadIdx.x; u < ROWS * kUnits; u += kThreads) {
      const int r = u / kUnits, c = (u % kUnits) * kVec;
      uint4 pk = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows_valid && c < d) pk = *reinterpret_cast<const uint4*>(src + r * ld + c);
      if constexpr (std::is_same_v<T, S> && (LDS * sizeof(S)) % 16 == 0) {
        *reinterpret_cast<uint4*>(dst + r * LDS + c) = pk;
      } else {
        const T* e = reinterpret_cast<const T*>(&pk);
#pragma unroll
        for (int j = 0; j < kVec; ++j) dst[r * LDS + c + j] = from_float<S>(to_float(e[j]));
      }
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * DP; e += kThreads) {
      const int r = e / DP, c = e % DP;
      const float x = (r < rows_valid && c < d) ? to_float(src[r * ld + c]) : 0.f;
      dst[r * LDS + c] = from_float<S>(x);
    }
  }
}

template <int DP>
struct MmaConfig {
  static constexpr int BM = 64;                  // query rows per block: 4 warps x 16
  static constexpr int BN = attn::v1_block_n(DP);  // K/V rows per tile
  static constexpr int LDS = DP + 8;             // smem row pitch (halves): 16-byte rows, no bank conflicts
  static constexpr size_t smem_bytes(int elem) { return attn::v1_mma_smem_bytes(DP, elem); }
};

// Tensor-core kernel (T = __half or __nv_bfloat16). Block blockIdx.x -> (b, h, query tile m0..m0+63).
// Shared memory: Q tile [64][LDS], K tile [BN][LDS], V tile [BN][LDS], all T.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) seg_attn_mma_kernel(const __grid_constant__ AttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel only on sm_80+
#else
  using Cfg = MmaConfig<DP>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LDS = Cfg::LDS;
  constexpr int NT = BN / 8;   // S n-tiles (8 keys) per warp
  constexpr int KT = DP / 16;  // k-steps over the head dim
  constexpr int OT = DP / 8;   // O n-tiles (8 head-dim columns)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * LDS;
  T* Vs = Ks + BN * LDS;

  const int bh = blockIdx.x / p.m_blocks, m0 = (blockIdx.x % p.m_blocks) * BM;
  const int b = bh / p.heads, h = bh % p.heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int qr = warp * 16 + g;  // this thread's query rows in the tile: qr and qr + 8

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_l;
  load_tile<T, T, BM, DP, LDS>(Qs, q, p.q_stride_l, p.lq - m0, p.d, p.vec16);

  float o[OT][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // running max (base 2) and sum per row

  for (int s = 0; s < p.n_segs; ++s) {
    const SegmentParam& sp = p.seg[s];
    const int len = p.len[s];
    const T* kb = static_cast<const T*>(sp.k) + b * sp.k_stride_b + h * sp.k_stride_h;
    const T* vb = static_cast<const T*>(sp.v) + b * sp.v_stride_b + h * sp.v_stride_h;
    for (int n0 = 0; n0 < len; n0 += BN) {
      __syncthreads();  // the previous K/V tile is consumed (and, first time round, Q is staged)
      load_tile<T, T, BN, DP, LDS>(Ks, kb + n0 * sp.k_stride_l, sp.k_stride_l, len - n0, p.d, p.vec16);
      load_tile<T, T, BN, DP, LDS>(Vs, vb + n0 * sp.v_stride_l, sp.v_stride_l, len - n0, p.d, p.vec16);
      __syncthreads();

      // S[16 x BN] = Q[16 x DP] · K[BN x DP]ᵀ for this warp's rows.
      float sc[NT][4] = {};
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        const T* qa = Qs + qr * LDS + kk * 16 + 2 * t;
        const uint32_t a[4] = {ld32(qa), ld32(qa + 8 * LDS), ld32(qa + 8), ld32(qa + 8 * LDS + 8)};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const T* kp = Ks + (j * 8 + g) * LDS + kk * 16 + 2 * t;
          mma16816<T>(sc[j], a, ld32(kp), ld32(kp + 8));
        }
      }

      // Online softmax. Element e of tile j is row qr + 8 * (e / 2), key n0 + j * 8 + 2t + e % 2; the
      // 4 lanes of a group (same g) share rows, so row reductions are two xor-shuffles.
      const int valid = len - n0;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = (j * 8 + 2 * t + (e & 1) < valid) ? sc[j][e] * p.scale_log2 : -INFINITY;
          sc[j][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      }
      float mref[2], alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float m_new = fmaxf(m_run[r], mx[r]);
        mref[r] = m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = exp2f(m_run[r] - mref[r]);
        m_run[r] = m_new;
      }
      float rs[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[j][e] = exp2f(sc[j][e] - mref[e >> 1]);
          rs[e >> 1] += sc[j][e];
        }
      }
      l_run[0] = l_run[0] * alpha[0] + rs[0];
      l_run[1] = l_run[1] * alpha[1] + rs[1];
#pragma unroll
      for (int nd = 0; nd < OT; ++nd) {
        o[nd][0] *= alpha[0];
        o[nd][1] *= alpha[0];
        o[nd][2] *= alpha[1];
        o[nd][3] *= alpha[1];
      }

      // O[16 x DP] += P[16 x BN] · V[BN x DP]. The S accumulators of tiles 2c, 2c+1 are exactly the
      // A fragment of key chunk c; B fragments gather two 16-bit V elements from consecutive rows.
      const uint16_t* v16 = reinterpret_cast<const uint16_t*>(Vs);
#pragma unroll
      for (int c = 0; c < BN / 16; ++c) {
        const uint32_t a[4] = {pack2<T>(sc[2 * c][0], sc[2 * c][1]), pack2<T>(sc[2 * c][2], sc[2 * c][3]),
                               pack2<T>(sc[2 * c + 1][0], sc[2 * c + 1][1]),
                               pack2<T>(sc[2 * c + 1][2], sc[2 * c + 1][3])};
#pragma unroll
        for (int nd = 0; nd < OT; ++nd) {
          const uint16_t* vp = v16 + (c * 16 + 2 * t) * LDS + nd * 8 + g;
          mma16816<T>(o[nd], a, static_cast<uint32_t>(vp[0]) | (static_cast<uint32_t>(vp[LDS]) << 16),
                      static_cast<uint32_t>(vp[8 * LDS]) | (static_cast<uint32_t>(vp[9 * LDS]) << 16));
        }
      }
    }
  }

  // Normalise and store rows qr, qr + 8 (columns < d).
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
  }
  T* out = static_cast<T*>(p.out) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + qr + 8 * r;
    if (row >= p.lq) continue;
#pragma unroll
    for (int nd = 0; nd < OT; ++nd) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nd * 8 + 2 * t + e;
        if (col < p.d) out[row * p.o_stride_l + col] = from_float<T>(o[nd][2 * r + e] * inv[r]);
      }
    }
  }
#endif
}

template <int DP>
struct SimtConfig {
  static constexpr int BM = 32;                  // query rows per block: 8 row groups x 4 rows
  static constexpr int BN = attn::v1_block_n(DP);  // K/V rows per tile
  static constexpr int LDQ = DP + 1, LDK = DP + 1, LDV = DP, LDP = BN + 1;  // odd pitches: no bank conflicts
  static constexpr size_t smem_bytes() { return attn::simt_smem_bytes(DP); }
};

// fp32 kernel (exact fp32 FMAs). Thread (ty = tid / 16, tx = tid % 16) owns query rows 4ty..4ty+3,
// S columns tx + 16c and O columns tx + 16c; the 16 threads of a half-warp share rows.
// Shared memory (float): Q [32][DP+1], K [BN][DP+1], V [BN][DP], P [32][BN+1].
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 1) seg_attn_simt_kernel(const __grid_constant__ AttnParams p) {
  using Cfg = SimtConfig<DP>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LDQ = Cfg::LDQ, LDK = Cfg::LDK, LDV = Cfg::LDV, LDP = Cfg::LDP;
  constexpr int NC = BN / 16, DC = DP / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* Qs = reinterpret_cast<float*>(smem_raw);
  float* Ks = Qs + BM * LDQ;
  float* Vs = Ks + BN * LDK;
  float* Ps = Vs + BN * LDV;

  const int bh = blockIdx.x / p.m_blocks, m0 = (blockIdx.x % p.m_blocks) * BM;
  const int b = bh / p.heads, h = bh % p.heads;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_l;
  load_tile<T, float, BM, DP, LDQ>(Qs, q, p.q_stride_l, p.lq - m0, p.d, p.vec16);

  float o[4][DC] = {};
  float m_run[4], l_run[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m_run[i] = -INFINITY;
    l_run[i] = 0.f;
  }

  for (int s = 0; s < p.n_segs; ++s) {
    const SegmentParam& sp = p.seg[s];
    const int len = p.len[s];
    const T* kb = static_cast<const T*>(sp.k) + b * sp.k_stride_b + h * sp.k_stride_h;
    const T* vb = static_cast<const T*>(sp.v) + b * sp.v_stride_b + h * sp.v_stride_h;
    for (int n0 = 0; n0 < len; n0 += BN) {
      __syncthreads();  // the previous K/V/P tile is consumed (and, first time round, Q is staged)
      load_tile<T, float, BN, DP, LDK>(Ks, kb + n0 * sp.k_stride_l, sp.k_stride_l, len - n0, p.d, p.vec16);
      load_tile<T, float, BN, DP, LDV>(Vs, vb + n0 * sp.v_stride_l, sp.v_stride_l, len - n0, p.d, p.vec16);
      __syncthreads();

      float sc[4][NC] = {};
#pragma unroll 4
      for (int k = 0; k < DP; ++k) {
        float qv[4], kv[NC];
#pragma unroll
        for (int i = 0; i < 4; ++i) qv[i] = Qs[(ty * 4 + i) * LDQ + k];
#pragma unroll
        for (int c = 0; c < NC; ++c) kv[c] = Ks[(tx + 16 * c) * LDK + k];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int c = 0; c < NC; ++c) sc[i][c] = fmaf(qv[i], kv[c], sc[i][c]);
        }
      }

      const int valid = len - n0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          sc[i][c] = (tx + 16 * c < valid) ? sc[i][c] * p.scale_log2 : -INFINITY;
          mx = fmaxf(mx, sc[i][c]);
        }
#pragma unroll
        for (int off = 1; off < 16; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_new = fmaxf(m_run[i], mx);
        const float mref = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m_run[i] - mref);
        m_run[i] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const float pv = exp2f(sc[i][c] - mref);
          Ps[(ty * 4 + i) * LDP + tx + 16 * c] = pv;
          rs += pv;
        }
        l_run[i] = l_run[i] * alpha + rs;
#pragma unroll
        for (int c = 0; c < DC; ++c) o[i][c] *= alpha;
      }
      __syncwarp();  // P rows 4ty..4ty+3 are written and read by the same half-warp

#pragma unroll 4
      for (int n = 0; n < BN; ++n) {
        float pv[4], vv[DC];
#pragma unroll
        for (int i = 0; i < 4; ++i) pv[i] = Ps[(ty * 4 + i) * LDP + n];
#pragma unroll
        for (int c = 0; c < DC; ++c) vv[c] = Vs[n * LDV + tx + 16 * c];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int c = 0; c < DC; ++c) o[i][c] = fmaf(pv[i], vv[c], o[i][c]);
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float l = l_run[i];
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = m0 + ty * 4 + i;
    if (row >= p.lq) continue;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int col = tx + 16 * c;
      if (col < p.d) out[row * p.o_stride_l + col] = from_float<T>(o[i][c] * inv);
    }
  }
}
// ---- host code ----

template <typename F>
void with_head_dim(int dp, F&& f) {
  switch (dp) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 48: f(std::integral_constant<int, 48>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 80: f(std::integral_constant<int, 80>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    case 112: f(std::integral_constant<int, 112>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 160: f(std::integral_constant<int, 160>{}); break;
    case 192: f(std::integral_constant<int, 192>{}); break;
    case 224: f(std::integral_constant<int, 224>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: TORCH_CHECK_VALUE(false, "halodiff: segmented_attention has no CUDA kernel for padded head dim ", dp);
  }
}

// Launches Kernel; its dynamic shared-memory limit is raised once per kernel and device (the size a kernel
// instantiation asks for is fixed), not on every launch.
template <auto Kernel, typename Params>
void launch(int64_t blocks, int threads, size_t smem, cudaStream_t stream, const Params& p) {
  TORCH_CHECK_VALUE(blocks <= INT32_MAX, "halodiff: segmented_attention grid too large: ", blocks, " blocks");
  if (smem > 48 * 1024) {
    static std::atomic<uint64_t> configured{0};  // bit i: done on device i (< 64; others set it every launch)
    const int dev = c10::cuda::current_device();
    const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
    if (bit == 0 || !(configured.load(std::memory_order_acquire) & bit)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      configured.fetch_or(bit, std::memory_order_acq_rel);
    }
  }
  Kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Strides (in elements) of dims 0-2 of a [B, H, L, D] tensor.
void set_strides(const at::Tensor& t, int64_t& b, int64_t& h, int64_t& l) {
  b = t.stride(0);
  h = t.stride(1);
  l = t.stride(2);
}

// Every row of t starts 16-byte aligned, so rows can be loaded `vec` elements at a time.
bool vec_loadable(const at::Tensor& t, int64_t vec) {
  return aligned16(t.const_data_ptr()) && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 && t.stride(2) % vec == 0;
}

// A tensor as the kernels read it: last dim dense (a copy only for other layouts, which the Python
// layer has already made contiguous).
at::Tensor dense_last_dim(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// HALODIFF_ATTENTION_KERNEL=v1|v2 (default v2), read once: which fp16/bf16 kernel the op runs. v1 is
// the previous kernel, kept selectable until a GPU run has validated v2 (bench/gpu_suite.sh tests both).
int attention_kernel_version() {
  static const char* env = std::getenv("HALODIFF_ATTENTION_KERNEL");
  static const int version = [] {
    const std::string v = env ? env : "";
    return v.empty() || v == "v2" || v == "2" ? 2 : v == "v1" || v == "1" ? 1 : 0;
  }();
  TORCH_CHECK_VALUE(version != 0, "halodiff: HALODIFF_ATTENTION_KERNEL must be v1 or v2 (default v2), got '", env,
                    "'");
  return version;
}

// v2 launch for one (dtype, padded head dim, tile). splits = 0: chosen to fill the GPU.
template <typename T, int DP, int WARPS, int MT>
void run_v2(attn::AttnParams& p, int64_t bh, int64_t lq, int splits, int sms, const at::TensorOptions& opts,
            cudaStream_t stream) {
  using Cfg = attn::V2Config<DP, WARPS, MT>;
  p.m_blocks = static_cast<int32_t>((lq + Cfg::BM - 1) / Cfg::BM);
  int64_t tiles = 0;
  for (int s = 0; s < p.n_segs; ++s) tiles += attn::tiles_of(p.len[s], Cfg::BN);
  TORCH_CHECK_VALUE(tiles <= INT32_MAX, "halodiff: segmented_attention has too many K/V rows");
  p.total_tiles = static_cast<int32_t>(tiles);
  const int64_t blocks = bh * p.m_blocks;
  p.splits = splits > 0 ? std::min<int>(splits, p.total_tiles) : attn::choose_splits(blocks, p.total_tiles, sms);
  at::Tensor o_part, lse;  // the caching allocator keeps them valid for the launches on this stream
  if (p.splits > 1) {
    o_part = at::empty({p.splits, bh * lq, DP}, opts.dtype(at::kFloat));
    lse = at::empty({p.splits, bh * lq}, opts.dtype(at::kFloat));
    p.o_part = o_part.mutable_data_ptr<float>();
    p.lse = lse.mutable_data_ptr<float>();
  }
  launch<attn::seg_attn_v2_kernel<T, DP, WARPS, MT>>(blocks * p.splits, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
  if (p.splits > 1) {
    const attn::MergeParams mp{p.o_part, p.lse, p.out, p.o_stride_b, p.o_stride_h, p.o_stride_l, bh * lq,
                               p.heads, p.lq, p.d, DP, p.splits, p.out_vec16};
    const int64_t threads = mp.rows * ((p.d + 7) / 8);
    launch<attn::seg_attn_merge_kernel<T>>((threads + 255) / 256, 256, 0, stream, mp);
  }
}

template <typename T, int DP>
void run_v2_tile(attn::AttnParams& p, attn::Tile tile, int64_t bh, int64_t lq, int splits, int sms,
                 const at::TensorOptions& opts, cudaStream_t stream) {
  TORCH_CHECK_VALUE(attn::v2_tile_supported(DP, tile.warps, tile.mt), "halodiff: no ", 16 * tile.warps * tile.mt,
                    "-row segmented_attention tile for head dim ", p.d, " (128 rows: head dim <= 64, 16 rows: <= 160)");
  if constexpr (attn::v2_tile_supported(DP, 1, 1)) {
    if (tile.warps == 1) return run_v2<T, DP, 1, 1>(p, bh, lq, splits, sms, opts, stream);
  }
  if constexpr (attn::v2_tile_supported(DP, 4, 2)) {
    if (tile.mt == 2) return run_v2<T, DP, 4, 2>(p, bh, lq, splits, sms, opts, stream);
  }
  run_v2<T, DP, 4, 1>(p, bh, lq, splits, sms, opts, stream);
}

// v2 reads rows with 16-byte cp.async: a tensor whose rows do not all start 16-byte aligned (an odd
// offset view, or a head dim that is not a multiple of 8 with such strides) is copied once into a
// [B, H, L, D rounded up to 8] buffer and read through a [..., :D] view of it.
at::Tensor aligned_rows(const at::Tensor& t, int64_t vec) {
  if (vec_loadable(t, vec)) return t;
  const int64_t d = t.size(3), dv = (d + vec - 1) / vec * vec;
  return at::empty({t.size(0), t.size(1), t.size(2), dv}, t.options()).narrow(3, 0, d).copy_(t);
}

}  // namespace

// Defined in segmented_attention_cpu.cpp (the argument checks shared with the CPU kernel).

namespace {

// version: 1 or 2 (fp16/bf16 kernel; fp32 always runs the SIMT kernel). block_m (v2): 0 = chosen,
// 16 = short-query tile (head dim <= 160), 64, 128 (head dim <= 64). splits (v2): 0 = chosen, else at most
// that many.
at::Tensor segmented_attention_impl(const at::Tensor& q_in, at::TensorList ks, at::TensorList vs,
                                    c10::optional<double> scale, int version, int block_m, int splits) {
  check_segmented_attention(q_in, ks, vs, scale);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "halodiff: segmented_attention CUDA kernel got q on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "halodiff: the segmented_attention CUDA kernel supports float16/bfloat16/float32, got ", dtype,
                   "; use the reference backend for other dtypes");
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  // Output: a [B, H, Lq, D] view of a contiguous [B, Lq, H, D] buffer (like torch's SDPA).
  at::Tensor out = at::empty({B, Lq, H, D}, q_in.options()).transpose(1, 2);
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(D <= kMaxHeadDim, "halodiff: the segmented_attention CUDA kernel supports head dims <= ",
                    kMaxHeadDim, ", got ", D, "; use the triton/reference backend");
  const int64_t vec = 16 / static_cast<int64_t>(q_in.element_size());
  const bool tensor_cores = dtype != at::kFloat;
  const bool v2 = tensor_cores && version == 2;
  auto prepare = [&](const at::Tensor& t) { return v2 ? aligned_rows(dense_last_dim(t), vec) : dense_last_dim(t); };
  const at::Tensor q = prepare(q_in);
  std::vector<at::Tensor> keep;  // owns any contiguous copies for the duration of the launch
  AttnParams p{};
  p.q = q.const_data_ptr();
  p.out = out.mutable_data_ptr();
  set_strides(q, p.q_stride_b, p.q_stride_h, p.q_stride_l);
  set_strides(out, p.o_stride_b, p.o_stride_h, p.o_stride_l);
  // v1/SIMT: 16-byte loads when every row is 16-byte aligned and d % vec == 0 (v2: always, see prepare).
  bool rows16 = vec_loadable(q, vec);
  int n = 0;
  for (size_t i = 0; i < ks.size(); ++i) {
    if (ks[i].size(2) == 0) continue;  // empty segments contribute nothing
    TORCH_CHECK_VALUE(n < kMaxSegments, "halodiff: the segmented_attention CUDA kernel takes at most ", kMaxSegments,
                      " non-empty segments in one launch, got more; use the triton/cpu/reference backend");
    TORCH_CHECK_VALUE(ks[i].size(2) <= INT32_MAX, "halodiff: segment ", i, " is too long (", ks[i].size(2), " rows)");
    const at::Tensor k = prepare(ks[i]), v = prepare(vs[i]);
    keep.push_back(k);
    keep.push_back(v);
    SegmentParam& s = p.seg[n];
    s.k = k.const_data_ptr();
    s.v = v.const_data_ptr();
    set_strides(k, s.k_stride_b, s.k_stride_h, s.k_stride_l);
    set_strides(v, s.v_stride_b, s.v_stride_h, s.v_stride_l);
    p.len[n] = static_cast<int32_t>(k.size(2));
    rows16 = rows16 && vec_loadable(k, vec) && vec_loadable(v, vec);
    ++n;
  }
  if (n == 0) return out.zero_();  // every segment is empty: no keys, the result is defined as zeros
  TORCH_CHECK_VALUE(Lq <= INT32_MAX && B * H <= INT32_MAX, "halodiff: segmented_attention shape too large: ", q.sizes());
  p.n_segs = n;
  p.heads = static_cast<int32_t>(H);
  p.lq = static_cast<int32_t>(Lq);
  p.d = static_cast<int32_t>(D);
  p.splits = 1;
  p.out_vec16 = vec_loadable(out, vec);
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  p.scale_log2 = static_cast<float>(s * 1.4426950408889634);  // log2(e)

  auto stream = at::cuda::getCurrentCUDAStream();
  const int dp = attn::padded_head_dim(static_cast<int>(D));
  const auto* props = at::cuda::getCurrentDeviceProperties();
  if (tensor_cores) {
    TORCH_CHECK_VALUE(props->major >= 8,
                      "halodiff: the float16/bfloat16 segmented_attention CUDA kernel needs sm_80+ (mma.sync bf16/f16"
                      " with fp32 accumulation); use the triton/reference backend on this GPU");
  }
  with_head_dim(dp, [&](auto dp_const) {
    constexpr int DP = decltype(dp_const)::value;
    if (v2) {
      p.vec16 = true;  // aligned_rows
      const int sms = props->multiProcessorCount;
      const attn::Tile tile = block_m == 16   ? attn::Tile{1, 1}
                              : block_m == 64  ? attn::Tile{4, 1}
                              : block_m == 128 ? attn::Tile{4, 2}
                                               : attn::choose_tile(B * H, Lq, DP, sms);
      if (dtype == at::kHalf) run_v2_tile<__half, DP>(p, tile, B * H, Lq, splits, sms, q.options(), stream);
      else run_v2_tile<__nv_bfloat16, DP>(p, tile, B * H, Lq, splits, sms, q.options(), stream);
    } else if (tensor_cores) {
      using Cfg = MmaConfig<DP>;
      p.vec16 = rows16 && D % vec == 0;
      p.m_blocks = static_cast<int32_t>((Lq + Cfg::BM - 1) / Cfg::BM);
      const size_t smem = Cfg::smem_bytes(static_cast<int>(q.element_size()));
      const int64_t blocks = B * H * p.m_blocks;
      if (dtype == at::kHalf) launch<seg_attn_mma_kernel<__half, DP>>(blocks, kThreads, smem, stream, p);
      else launch<seg_attn_mma_kernel<__nv_bfloat16, DP>>(blocks, kThreads, smem, stream, p);
    } else {
      using Cfg = SimtConfig<DP>;
      p.vec16 = rows16 && D % vec == 0;
      p.m_blocks = static_cast<int32_t>((Lq + Cfg::BM - 1) / Cfg::BM);
      launch<seg_attn_simt_kernel<float, DP>>(B * H * p.m_blocks, kThreads, Cfg::smem_bytes(), stream, p);
    }
  });
  return out;
}

at::Tensor segmented_attention_cuda(const at::Tensor& q, at::TensorList ks, at::TensorList vs,
                                    c10::optional<double> scale) {
  return segmented_attention_impl(q, ks, vs, scale, attention_kernel_version(), 0, 0);
}

// Tests and benchmarks: one kernel variant explicitly, whatever HALODIFF_ATTENTION_KERNEL says.
at::Tensor segmented_attention_cuda_variant(const at::Tensor& q, at::TensorList ks, at::TensorList vs,
                                            c10::optional<double> scale, int64_t version, int64_t block_m,
                                            int64_t splits) {
  TORCH_CHECK_VALUE(version == 1 || version == 2, "halodiff: version must be 1 or 2, got ", version);
  TORCH_CHECK_VALUE(block_m == 0 || block_m == 16 || block_m == 64 || block_m == 128,
                    "halodiff: block_m must be 0 (auto), 16, 64 or 128, got ", block_m);
  TORCH_CHECK_VALUE(splits >= 0 && splits <= attn::kMaxSplits, "halodiff: splits must be in [0, ", attn::kMaxSplits,
                    "] (0 = auto), got ", splits);
  return segmented_attention_impl(q, ks, vs, scale, static_cast<int>(version), static_cast<int>(block_m),
                                  static_cast<int>(splits));
}

}  // namespace
}  // namespace halodiff

// A CUDA-only schema beside the shared ones of ops.cpp: `_segmented_attention_cuda` runs a chosen kernel
// variant (tests, benchmarks, the audit); halodiff::segmented_attention runs the one selected above.
TORCH_LIBRARY_FRAGMENT(halodiff, m) {
  m.def("_segmented_attention_cuda(Tensor q, Tensor[] ks, Tensor[] vs, float? scale, int version, int block_m, "
        "int splits) -> Tensor");
}

TORCH_LIBRARY_IMPL(halodiff, CUDA, m) {
  m.impl("segmented_attention", &halodiff::segmented_attention_cuda);
  m.impl("_segmented_attention_cuda", &halodiff::segmented_attention_cuda_variant);
}

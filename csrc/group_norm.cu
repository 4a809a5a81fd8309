// CUDA kernels for halodiff::group_stats, group_norm and group_norm_stale, NCHW or channels_last (in place).
//
// Launches per call (stream-ordered, no host sync, no cast kernels; weight/bias/stats read in place):
//   group_stats        partials + reduce                      = 2 (1 when one block per group suffices)
//   group_norm         partials + apply (sums the partials)   = 2; with external stats: apply = 1
//   group_norm_stale   partials + reduce (-> local) + apply   = 3 (2 when one block per group suffices)
// Kernels:
//   partials  grid (B*G, splits): block (bg, s) reads its chunk of group bg once; shifted float32 sums
//             (float64 for float64 x) become unshifted float64 (Σx, Σx²) (halodiff.h: unshift_sums).
//   reduce    one thread per (b, g): adds the split partials in a fixed order (deterministic).
//   apply     reads x once, writes y once in 16-byte packs. A block first computes mean/rstd of the
//             groups it touches (float64, from partials, external stats or the stale estimate) and
//             scale/shift of its channels into shared memory; the hot loop is x * scale + shift
//             (+ SiLU) in float32 (float64 for float64 x), with 32-bit in-tile indexing and no divide.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "halodiff.h"

namespace halodiff {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per 16-byte pack.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

// n / d for 0 <= n, d < 2^31 with a multiply-high and a shift (as ATen's IntDivider).
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor > 0 ? divisor : 1) {
    while ((1u << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

// a / b and a % b for 0 <= a, b < 2^31 (checked on the host: check_grid) as 32-bit unsigned ops: inline,
// unlike 64-bit division (a subroutine call). Used once per block or per channel, never per pack.
__device__ __forceinline__ int64_t div32(int64_t a, int64_t b) {
  return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
}
__device__ __forceinline__ int64_t mod32(int64_t a, int64_t b) {
  return static_cast<uint32_t>(a) % static_cast<uint32_t>(b);
}

// Geometry of x as the kernels read it (GroupInput, flattened for kernel parameters).
struct Geom {
  int64_t C, HW, G, cpg;
};

template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  __shared__ acc_t sa[kThreads / 32], sb[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? sa[lane] : acc_t(0);
    b = lane < kThreads / 32 ? sb[lane] : acc_t(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, off);
      b += __shfl_xor_sync(0xffffffffu, b, off);
    }
  }
}

// grid = (B*G, splits). NCHW: block (bg, s) sums elements [s*chunk, min(gn, (s+1)*chunk)) of the contiguous
// group; channels_last: rows (positions) [s*chunk, ...) of cpg channels each, C elements apart.
// Shift K = the chunk's first element. Writes float64 (Σx, Σx²) to partial[bg * splits + s].
template <typename scalar_t, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads) group_partials_kernel(const scalar_t* __restrict__ x, Geom g,
                                                                  int64_t chunk, FastDiv packs_per_row,
                                                                  double* __restrict__ partial) {
  using acc_t = acc_type<scalar_t>;
  const int64_t bg = blockIdx.x, s = blockIdx.y;
  const scalar_t* base;
  int64_t begin, end, n;
  if constexpr (CL) {
    base = x + div32(bg, g.G) * g.HW * g.C + mod32(bg, g.G) * g.cpg;
    begin = s * chunk;
    end = min(g.HW, begin + chunk);
    n = (end - begin) * g.cpg;
  } else {
    base = x + bg * g.cpg * g.HW;
    begin = s * chunk;
    end = min(g.cpg * g.HW, begin + chunk);
    n = end - begin;
  }
  const acc_t k = static_cast<acc_t>(base[CL ? begin * g.C : begin]);
  acc_t s1 = 0, s2 = 0;
  if constexpr (CL) {
    // Work item j = (row j / ppr, pack j % ppr) of the chunk; 32-bit, divide by multiply-high.
    const scalar_t* p0 = base + begin * g.C;
    const uint32_t items = static_cast<uint32_t>(n / VEC);
    for (uint32_t j = threadIdx.x; j < items; j += kThreads) {
      const uint32_t row = packs_per_row.div(j), col = j - row * packs_per_row.d;
      const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p0 + row * g.C + col * VEC);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t d = static_cast<acc_t>(pk.v[v]) - k;
        s1 += d;
        s2 += d * d;
      }
    }
  } else {
    // begin and end are multiples of VEC (checked on the host).
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end; i += int64_t{kThreads} * VEC) {
      const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(base + i);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t d = static_cast<acc_t>(pk.v[v]) - k;
        s1 += d;
        s2 += d * d;
      }
    }
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    double sum = 0, sumsq = 0;
    unshift_sums(s1, s2, static_cast<double>(n), k, sum, sumsq);
    partial[(bg * gridDim.y + s) * 2] = sum;
    partial[(bg * gridDim.y + s) * 2 + 1] = sumsq;
  }
}

// One thread per (b, g): adds its `splits` partials in a fixed order (deterministic).
__global__ void reduce_partials_kernel(const double* __restrict__ partial, int64_t n_bg, int splits,
                                       double* __restrict__ out) {
  const int64_t bg = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bg >= n_bg) return;
  double s1 = 0, s2 = 0;
  for (int s = 0; s < splits; ++s) {
    s1 += partial[(bg * splits + s) * 2];
    s2 += partial[(bg * splits + s) * 2 + 1];
  }
  out[bg * 2] = s1;
  out[bg * 2 + 1] = s2;
}

// What the apply kernel needs besides x/y: where mean/var come from and the affine parameters.
struct ApplyArgs {
  StatsSource src;
  const double* sums;  // the group's own sums as `splits` partials per (b, g) (unused for external stats)
  int splits;
  ParamRef w, b;
};

struct ChanGroup {
  int64_t c, k;  // a channel and its group's index among the block's groups
};

// Block prologue: mean/rstd (float64) of the flattened groups [bg0, bg0 + ng) (ng <= kThreads), then
// scale = rstd * w[c], shift = b[c] - mean * scale of the block's n channels into s_sc/s_sh (compute type).
// chan(i) -> ChanGroup of the block's i-th channel. Ends with __syncthreads.
template <typename acc_t, typename Chan>
__device__ __forceinline__ void block_scale_shift(const ApplyArgs& a, int64_t bg0, int ng, int64_t n, Chan chan,
                                                  acc_t* s_sc, acc_t* s_sh) {
  __shared__ double s_mean[kThreads], s_rstd[kThreads];
  for (int i = threadIdx.x; i < ng; i += kThreads) {
    const int64_t bg = bg0 + i;
    double s1 = 0, s2 = 0;
    if (a.src.needs_local()) {
      for (int s = 0; s < a.splits; ++s) {
        s1 += a.sums[(bg * a.splits + s) * 2];
        s2 += a.sums[(bg * a.splits + s) * 2 + 1];
      }
    }
    const Moments m = a.src.moments(bg, s1, s2);
    s_mean[i] = m.mean;
    s_rstd[i] = m.rstd;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const ChanGroup cg = chan(i);
    const double sc = s_rstd[cg.k] * a.w.at(cg.c, 1.0);
    s_sc[i] = static_cast<acc_t>(sc);
    s_sh[i] = static_cast<acc_t>(a.b.at(cg.c, 0.0) - s_mean[cg.k] * sc);
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t, int VEC, bool SILU>
__device__ __forceinline__ void affine_pack(const scalar_t* src, scalar_t* dst, const acc_t* sc, const acc_t* sh) {
  Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(src);
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    acc_t y = static_cast<acc_t>(pk.v[v]) * sc[v] + sh[v];
    if (SILU) y = y / (acc_t(1) + exp(-y));
    pk.v[v] = static_cast<scalar_t>(y);
  }
  *reinterpret_cast<Pack<scalar_t, VEC>*>(dst) = pk;
}

// NCHW. Block tile: TP = kThreads >> th_log2 planes (b, c) x (TH = 1 << th_log2) pack columns, `iters`
// column steps. grid = (ceil(B*C / TP), ceil(packs per plane / (TH * iters))). Reads x once, writes y once.
template <typename scalar_t, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads) apply_nchw_kernel(const scalar_t* __restrict__ x,
                                                              scalar_t* __restrict__ y, Geom g, int64_t planes,
                                                              int th_log2, int iters, ApplyArgs a) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t s_sc[kThreads], s_sh[kThreads];
  const int tp = kThreads >> th_log2;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * tp;
  const int64_t p1 = min(planes, p0 + tp);
  // The planes (b, c) of one block span the flattened groups b*G + c/cpg in [bg_lo, bg_hi].
  auto group_of = [&](int64_t p) { return div32(p, g.C) * g.G + div32(mod32(p, g.C), g.cpg); };
  const int64_t bg_lo = group_of(p0);
  block_scale_shift(a, bg_lo, static_cast<int>(group_of(p1 - 1) - bg_lo + 1), p1 - p0,
                    [&](int64_t i) { return ChanGroup{mod32(p0 + i, g.C), group_of(p0 + i) - bg_lo}; },
                    s_sc, s_sh);
  const int row = threadIdx.x >> th_log2, th = 1 << th_log2;
  if (p0 + row >= p1) return;
  acc_t sc[VEC], sh[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sc[v] = s_sc[row];
    sh[v] = s_sh[row];
  }
  const int64_t ppp = g.HW / VEC;  // packs per plane
  const int64_t plane = (p0 + row) * g.HW;
  int64_t col = static_cast<int64_t>(blockIdx.y) * th * iters + (threadIdx.x & (th - 1));
  for (int it = 0; it < iters && col < ppp; ++it, col += th)
    affine_pack<scalar_t, acc_t, VEC, SILU>(x + plane + col * VEC, y + plane + col * VEC, sc, sh);
}

// channels_last: rows (b, position) of C channels. Block tile: TH = 1 << th_log2 channel-pack columns x
// TP = kThreads >> th_log2 rows, `iters` row steps, all rows of one batch b.
// grid = (B * row_blocks, ceil(C / VEC / TH)). Reads x once, writes y once.
template <typename scalar_t, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads) apply_nhwc_kernel(const scalar_t* __restrict__ x,
                                                              scalar_t* __restrict__ y, Geom g, int64_t row_blocks,
                                                              int th_log2, int iters, ApplyArgs a) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t s_sc[kThreads * VEC], s_sh[kThreads * VEC];
  const int th = 1 << th_log2, tp = kThreads >> th_log2;
  const int64_t b = div32(blockIdx.x, row_blocks), rb = mod32(blockIdx.x, row_blocks);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * th * VEC, c1 = min(g.C, c0 + th * VEC);
  const int64_t g_lo = div32(c0, g.cpg);  // the block's channels span groups [g_lo, (c1 - 1) / cpg] of batch b
  block_scale_shift(a, b * g.G + g_lo, static_cast<int>(div32(c1 - 1, g.cpg) - g_lo + 1), c1 - c0,
                    [&](int64_t i) { return ChanGroup{c0 + i, div32(c0 + i, g.cpg) - g_lo}; },
                    s_sc, s_sh);
  const int col = threadIdx.x & (th - 1);
  if (c0 + col * VEC >= c1) return;
  acc_t sc[VEC], sh[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sc[v] = s_sc[col * VEC + v];
    sh[v] = s_sh[col * VEC + v];
  }
  int64_t pos = rb * tp * iters + (threadIdx.x >> th_log2);
  const int64_t off = (b * g.HW + pos) * g.C + c0 + col * VEC, step = static_cast<int64_t>(tp) * g.C;
  const scalar_t* src = x + off;
  scalar_t* dst = y + off;
  for (int it = 0; it < iters && pos < g.HW; ++it, pos += tp, src += step, dst += step)
    affine_pack<scalar_t, acc_t, VEC, SILU>(src, dst, sc, sh);
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int log2_ceil(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// 16-byte packs when every pack stays in one (b, c) plane (NCHW) or one group's channels (NHWC) and the
// pointers are aligned; single elements otherwise.
template <typename scalar_t>
int pick_vec(const GroupInput& in, const at::Tensor& out) {
  constexpr int v = kVec<scalar_t>;
  const bool aligned = reinterpret_cast<uintptr_t>(in.x.const_data_ptr()) % 16 == 0 &&
                       (!out.defined() || reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0);
  return aligned && (in.channels_last ? in.cpg : in.HW) % v == 0 ? v : 1;
}

// The statistics pass: float64 partial sums [B*G, splits, 2]; `into` receives them when splits == 1.
struct Partials {
  at::Tensor sums;
  int splits;
};

template <typename scalar_t>
Partials launch_partials(const GroupInput& in, const at::Tensor& into) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_bg = in.B * in.G;
  const int vec = pick_vec<scalar_t>(in, at::Tensor());
  // Chunks along the group's elements (NCHW) or rows (NHWC); enough blocks to fill the GPU ~4x, each
  // with at least 4 passes of the block.
  const int64_t extent = in.channels_last ? in.HW : in.group_numel();
  const int64_t per_unit = in.channels_last ? in.cpg : 1;
  const int64_t min_chunk = (int64_t{kThreads} * vec * 4 + per_unit - 1) / per_unit;
  const int64_t want = std::max<int64_t>(1, (4 * num_sms() + n_bg - 1) / n_bg);
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, (extent + min_chunk - 1) / min_chunk));
  int64_t chunk = (extent + splits - 1) / splits;
  if (!in.channels_last) chunk = (chunk + vec - 1) / vec * vec;
  splits = (extent + chunk - 1) / chunk;
  at::Tensor sums = splits == 1 && into.defined() ? into : at::empty({n_bg, splits, 2}, in.x.options().dtype(at::kDouble));
  const dim3 grid(static_cast<unsigned>(n_bg), static_cast<unsigned>(splits));
  const Geom g{in.C, in.HW, in.G, in.cpg};
  const FastDiv ppr(static_cast<uint32_t>(std::max<int64_t>(1, in.cpg / vec)));  // channels_last: packs per row
  const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
  double* out = sums.mutable_data_ptr<double>();
  constexpr int V = kVec<scalar_t>;
  if (in.channels_last) {
    if (vec == V) group_partials_kernel<scalar_t, V, true><<<grid, kThreads, 0, stream>>>(xp, g, chunk, ppr, out);
    else group_partials_kernel<scalar_t, 1, true><<<grid, kThreads, 0, stream>>>(xp, g, chunk, ppr, out);
  } else {
    if (vec == V) group_partials_kernel<scalar_t, V, false><<<grid, kThreads, 0, stream>>>(xp, g, chunk, ppr, out);
    else group_partials_kernel<scalar_t, 1, false><<<grid, kThreads, 0, stream>>>(xp, g, chunk, ppr, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sums, static_cast<int>(splits)};
}

// The partials reduced into `out` (float64 [B, G, 2]): no launch when they already are `out`.
void reduce_into(const Partials& p, const at::Tensor& out) {
  if (p.sums.data_ptr() == out.data_ptr()) return;
  const int64_t n_bg = out.size(0) * out.size(1);
  reduce_partials_kernel<<<(n_bg + 127) / 128, 128, 0, at::cuda::getCurrentCUDAStream()>>>(
      p.sums.const_data_ptr<double>(), n_bg, p.splits, out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool SILU>
void launch_apply(const GroupInput& in, at::Tensor& out, const ApplyArgs& a) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int vec = pick_vec<scalar_t>(in, out);
  constexpr int V = kVec<scalar_t>;
  const Geom g{in.C, in.HW, in.G, in.cpg};
  const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  if (!in.channels_last) {
    const int64_t ppp = in.HW / vec, planes = in.B * in.C;
    const int th_log2 = std::min(log2_ceil(ppp), 8);
    const int64_t th = int64_t{1} << th_log2;
    const int iters = static_cast<int>(std::min<int64_t>(4, (ppp + th - 1) / th));
    const dim3 grid(static_cast<unsigned>((planes + (kThreads >> th_log2) - 1) / (kThreads >> th_log2)),
                    static_cast<unsigned>((ppp + th * iters - 1) / (th * iters)));
    if (vec == V) apply_nchw_kernel<scalar_t, V, SILU><<<grid, kThreads, 0, stream>>>(xp, yp, g, planes, th_log2, iters, a);
    else apply_nchw_kernel<scalar_t, 1, SILU><<<grid, kThreads, 0, stream>>>(xp, yp, g, planes, th_log2, iters, a);
  } else {
    const int64_t packs = in.C / vec;
    const int th_log2 = std::min(log2_ceil(packs), 8);
    const int64_t tp = kThreads >> th_log2;
    const int iters = static_cast<int>(std::min<int64_t>(4, (in.HW + tp - 1) / tp));
    const int64_t row_blocks = (in.HW + tp * iters - 1) / (tp * iters);
    const dim3 grid(static_cast<unsigned>(in.B * row_blocks),
                    static_cast<unsigned>((packs + (int64_t{1} << th_log2) - 1) >> th_log2));
    if (vec == V) apply_nhwc_kernel<scalar_t, V, SILU><<<grid, kThreads, 0, stream>>>(xp, yp, g, row_blocks, th_log2, iters, a);
    else apply_nhwc_kernel<scalar_t, 1, SILU><<<grid, kThreads, 0, stream>>>(xp, yp, g, row_blocks, th_log2, iters, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_grid(const GroupInput& in) {
  constexpr int64_t kMax = 0x7fffffff;
  TORCH_CHECK_VALUE(in.B * in.C <= kMax && in.cpg * in.HW <= kMax && in.B * in.HW <= kMax,
                    "halodiff: the group_norm CUDA kernels need B*C, B*H*W and C/G*H*W below 2^31 (32-bit "
                    "block indexing); split the batch");
}

// group_norm / group_norm_stale: own sums where needed (into `local` when defined), then the apply pass.
template <typename scalar_t>
void run_group_norm(const GroupInput& in, at::Tensor& out, StatsSource src, bool silu,
                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& local) {
  ApplyArgs a{src, nullptr, 1, param_ref(weight), param_ref(bias)};
  Partials p;
  if (src.needs_local()) {
    p = launch_partials<scalar_t>(in, local);
    if (local.defined()) {
      reduce_into(p, local);
      a.sums = local.const_data_ptr<double>();
    } else {
      a.sums = p.sums.const_data_ptr<double>();
      a.splits = p.splits;
    }
  }
  if (silu) launch_apply<scalar_t, true>(in, out, a);
  else launch_apply<scalar_t, false>(in, out, a);
}

at::Tensor group_stats_cuda(const at::Tensor& x_in, int64_t num_groups) {
  check_group_args(x_in, num_groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const GroupInput in = group_input(x_in, num_groups);
  at::Tensor out = empty_group_sums(in);
  if (out.numel() == 0) return out;
  if (in.x.numel() == 0) return out.zero_();
  check_grid(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_stats_cuda", [&] {
    reduce_into(launch_partials<scalar_t>(in, out), out);
  });
  return out;
}

at::Tensor group_norm_cuda(const at::Tensor& x_in, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, double eps, bool silu,
                           const c10::optional<at::Tensor>& stats, double count) {
  check_group_norm_args(x_in, num_groups, weight, bias, stats, count);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const GroupInput in = group_input(x_in, num_groups);
  at::Tensor out = empty_group_output(in);
  if (out.numel() == 0) return out;
  check_grid(in);
  const c10::optional<at::Tensor> st = contiguous_sums(stats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_norm_cuda", [&] {
    run_group_norm<scalar_t>(in, out, stats_source(in, st, count, eps), silu, weight, bias, at::Tensor());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> group_norm_stale_cuda(const at::Tensor& x_in, int64_t num_groups,
                                                         const c10::optional<at::Tensor>& weight,
                                                         const c10::optional<at::Tensor>& bias, double eps, bool silu,
                                                         const at::Tensor& stale_global,
                                                         const at::Tensor& stale_local, double count) {
  check_group_norm_stale_args(x_in, num_groups, weight, bias, stale_global, stale_local, count);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const GroupInput in = group_input(x_in, num_groups);
  at::Tensor out = empty_group_output(in);
  at::Tensor local = empty_group_sums(in);
  if (local.numel() == 0) return {out, local};
  if (out.numel() == 0) return {out, local.zero_()};
  check_grid(in);
  const at::Tensor sg = stale_global.contiguous(), sl = stale_local.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_norm_stale_cuda", [&] {
    run_group_norm<scalar_t>(in, out, stale_source(in, sg, sl, count, eps), silu, weight, bias,
                             local);
  });
  return {out, local};
}

}  // namespace
}  // namespace halodiff

TORCH_LIBRARY_IMPL(halodiff, CUDA, m) {
  m.impl("group_stats", &halodiff::group_stats_cuda);
  m.impl("group_norm", &halodiff::group_norm_cuda);
  m.impl("group_norm_stale", &halodiff::group_norm_stale_cuda);
}

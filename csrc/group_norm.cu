// CUDA kernels for halodiff::group_stats and halodiff::group_norm.
//   stats:  one read of x   -> per-(b, g, split) partial sums, reduced by a second tiny kernel
//   norm:   one read + one write of x, with per-(b, c) scale/shift precomputed (B*C floats)
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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

// grid = (B*G, splits). Block (bg, s) sums elements [s*chunk, min((s+1)*chunk, n)) of group bg.
// Reads: the group's slice of x once. Writes: 2 floats per block.
template <typename acc_t>
struct Acc2 {
  acc_t x, y;
};

template <typename acc_t>
__device__ __forceinline__ Acc2<acc_t> warp_sum2(Acc2<acc_t> a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a.x += __shfl_xor_sync(0xffffffffu, a.x, off);
    a.y += __shfl_xor_sync(0xffffffffu, a.y, off);
  }
  return a;
}

// acc_t is float (double for double inputs): partial sums and the result use it.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void group_partial_sums_kernel(const scalar_t* __restrict__ x, int64_t group_numel, int64_t chunk,
                                          acc_t* __restrict__ partial) {
  const int64_t bg = blockIdx.x, s = blockIdx.y;
  const int64_t begin = s * chunk, end = min(group_numel, begin + chunk);
  const scalar_t* p = x + bg * group_numel;
  Acc2<acc_t> acc{0, 0};
  // begin and end are multiples of VEC whenever VEC > 1 (checked on the host).
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end; i += static_cast<int64_t>(kThreads) * VEC) {
    Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t v = static_cast<acc_t>(pk.v[j]);
      acc.x += v;
      acc.y += v * v;
    }
  }
  acc = warp_sum2(acc);
  __shared__ Acc2<acc_t> warp_acc[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_acc[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kThreads / 32 ? warp_acc[lane] : Acc2<acc_t>{0, 0};
    acc = warp_sum2(acc);
    if (lane == 0) {
      partial[(bg * gridDim.y + s) * 2] = acc.x;
      partial[(bg * gridDim.y + s) * 2 + 1] = acc.y;
    }
  }
}

// One thread per (b, g): adds the `splits` partials in a fixed order (deterministic).
template <typename acc_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partial, int64_t n_bg, int splits,
                                       acc_t* __restrict__ out) {
  const int64_t bg = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bg >= n_bg) return;
  acc_t s1 = 0, s2 = 0;
  for (int s = 0; s < splits; ++s) {
    s1 += partial[(bg * splits + s) * 2];
    s2 += partial[(bg * splits + s) * 2 + 1];
  }
  out[bg * 2] = s1;
  out[bg * 2 + 1] = s2;
}

// One thread per (b, c): scale = rstd * w[c], shift = bias[c] - mean * scale.
template <typename acc_t>
__global__ void scale_shift_kernel(const double* __restrict__ stats, const double* __restrict__ w,
                                   const double* __restrict__ bias, int64_t B, int64_t C, int64_t G, double count,
                                   double eps, acc_t* __restrict__ scale, acc_t* __restrict__ shift) {
  const int64_t bc = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bc >= B * C) return;
  const int64_t b = bc / C, c = bc % C, g = c / (C / G);
  const double mean = stats[(b * G + g) * 2] / count;
  const double var = fmax(0.0, stats[(b * G + g) * 2 + 1] / count - mean * mean);
  const double rstd = rsqrt(var + eps);
  const double sc = rstd * (w ? w[c] : 1.0);
  scale[bc] = static_cast<acc_t>(sc);
  shift[bc] = static_cast<acc_t>((bias ? bias[c] : 0.0) - mean * sc);
}

// Grid-stride over VEC-element packs. Each pack lies in one (b, c) plane (HW % VEC == 0).
// Reads x once, writes y once.
template <typename scalar_t, typename acc_t, int VEC, bool SILU>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n_packs, int64_t HW,
                             const acc_t* __restrict__ scale, const acc_t* __restrict__ shift) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC, bc = e / HW;
    const acc_t sc = scale[bc], sh = shift[bc];
    Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t v = static_cast<acc_t>(pk.v[j]) * sc + sh;
      if (SILU) v = v / (acc_t(1) + exp(-v));
      pk.v[j] = static_cast<scalar_t>(v);
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(y + e) = pk;
  }
}

template <typename scalar_t>
int pick_vec(const void* ptr, int64_t divisor) {
  int vec = 16 / static_cast<int>(sizeof(scalar_t));
  while (vec > 1 && (divisor % vec != 0 || reinterpret_cast<uintptr_t>(ptr) % (vec * sizeof(scalar_t)) != 0)) vec /= 2;
  return vec;
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

template <typename scalar_t>
void launch_group_stats(const at::Tensor& x, int64_t n_bg, int64_t group_numel, at::Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int vec = pick_vec<scalar_t>(x.const_data_ptr(), group_numel);
  // Enough blocks to fill the GPU ~4x, each with at least a few passes of the block.
  const int64_t want = std::max<int64_t>(1, (4 * num_sms() + n_bg - 1) / n_bg);
  const int64_t min_chunk = static_cast<int64_t>(kThreads) * vec * 4;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, (group_numel + min_chunk - 1) / min_chunk));
  int64_t chunk = (group_numel + splits - 1) / splits;
  chunk = (chunk + vec - 1) / vec * vec;
  splits = (group_numel + chunk - 1) / chunk;
  at::Tensor partial = at::empty({n_bg, splits, 2}, out.options());
  const dim3 grid(static_cast<unsigned>(n_bg), static_cast<unsigned>(splits));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* pp = partial.mutable_data_ptr<acc_t>();
  switch (vec) {
    case 8: group_partial_sums_kernel<scalar_t, acc_t, 8><<<grid, kThreads, 0, stream>>>(xp, group_numel, chunk, pp); break;
    case 4: group_partial_sums_kernel<scalar_t, acc_t, 4><<<grid, kThreads, 0, stream>>>(xp, group_numel, chunk, pp); break;
    case 2: group_partial_sums_kernel<scalar_t, acc_t, 2><<<grid, kThreads, 0, stream>>>(xp, group_numel, chunk, pp); break;
    default: group_partial_sums_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(xp, group_numel, chunk, pp); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_partials_kernel<acc_t><<<(n_bg + 127) / 128, 128, 0, stream>>>(
      partial.const_data_ptr<acc_t>(), n_bg, static_cast<int>(splits), out.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, bool SILU>
void launch_apply_vec(const at::Tensor& x, at::Tensor& out, int64_t HW, const acc_t* sc, const acc_t* sh) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int vec = pick_vec<scalar_t>(x.const_data_ptr(), HW);
  const int64_t n_packs = x.numel() / vec;
  const int blocks = static_cast<int>(std::min<int64_t>((n_packs + 255) / 256, 16LL * num_sms()));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  switch (vec) {
    case 8: apply_kernel<scalar_t, acc_t, 8, SILU><<<blocks, 256, 0, stream>>>(xp, yp, n_packs, HW, sc, sh); break;
    case 4: apply_kernel<scalar_t, acc_t, 4, SILU><<<blocks, 256, 0, stream>>>(xp, yp, n_packs, HW, sc, sh); break;
    case 2: apply_kernel<scalar_t, acc_t, 2, SILU><<<blocks, 256, 0, stream>>>(xp, yp, n_packs, HW, sc, sh); break;
    default: apply_kernel<scalar_t, acc_t, 1, SILU><<<blocks, 256, 0, stream>>>(xp, yp, n_packs, HW, sc, sh); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor group_stats_cuda(const at::Tensor& x_in, int64_t num_groups) {
  check_group_args(x_in, num_groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), n_bg = B * num_groups;
  // float32 sums (float64 for float64 inputs).
  at::Tensor out = at::empty({B, num_groups, 2},
                             x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (n_bg == 0) return out;
  const int64_t group_numel = x.numel() / n_bg;
  if (group_numel == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_stats_cuda", [&] {
    launch_group_stats<scalar_t>(x, n_bg, group_numel, out);
  });
  return out;
}

at::Tensor group_norm_cuda(const at::Tensor& x_in, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, double eps, bool silu,
                           const c10::optional<at::Tensor>& stats, double count) {
  check_group_norm_args(x_in, num_groups, weight, bias, stats, count);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  at::Tensor st;
  double n = count;
  if (stats.has_value() && stats->defined()) {
    st = stats->to(at::kDouble).contiguous();  // [B, G, 2]: a tiny conversion
  } else {
    st = group_stats_cuda(x, num_groups).to(at::kDouble);
    n = static_cast<double>(C / num_groups * HW);
  }
  const at::Tensor w = (weight.has_value() && weight->defined()) ? weight->to(at::kDouble).contiguous() : at::Tensor();
  const at::Tensor bb = (bias.has_value() && bias->defined()) ? bias->to(at::kDouble).contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_cuda", [&] {
    // Per-(b, c) scale/shift in the compute type: float, double for double inputs.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::Tensor ss = at::empty({2, B * C}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* sc = ss[0].mutable_data_ptr<acc_t>();
    acc_t* sh = ss[1].mutable_data_ptr<acc_t>();
    scale_shift_kernel<acc_t><<<(B * C + 255) / 256, 256, 0, stream>>>(
        st.const_data_ptr<double>(), w.defined() ? w.const_data_ptr<double>() : nullptr,
        bb.defined() ? bb.const_data_ptr<double>() : nullptr, B, C, num_groups, n, eps, sc, sh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (silu) launch_apply_vec<scalar_t, acc_t, true>(x, out, HW, sc, sh);
    else launch_apply_vec<scalar_t, acc_t, false>(x, out, HW, sc, sh);
  });
  return out;
}

}  // namespace
}  // namespace halodiff

TORCH_LIBRARY_IMPL(halodiff, CUDA, m) {
  m.impl("group_stats", &halodiff::group_stats_cuda);
  m.impl("group_norm", &halodiff::group_norm_cuda);
}

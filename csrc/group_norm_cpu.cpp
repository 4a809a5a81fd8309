// CPU kernels for halodiff::group_stats, group_norm and group_norm_stale (NCHW and channels_last).
//   stats: shifted block sums (halodiff.h: unshift_sums) of 2048-element blocks -> float64 (Σx, Σx²)
//   NCHW:  one task per (b, group): its sums (unless given), then y = x * scale + shift per channel
//          plane; the group's second read comes from cache.
//   NHWC:  per-channel shifted sums along chunks of rows (contiguous, vectorised over C), folded into
//          float64 group sums in a fixed order; then y = x * scale[c] + shift[c] along each row of C
//          channels (scale/shift per (b, c) computed once).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "halodiff.h"

namespace halodiff {
namespace {

constexpr int64_t kBlock = 2048;  // elements per shifted block

// Tasks of at least ~32K elements, so small tensors stay on one thread.
int64_t grain(int64_t numel) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, numel)); }

// Adds Σ(x−k), Σ(x−k)² of p[0:n] to (a1, a2) in the opmath type, 8 independent lanes (vectorisable
// without reassociation flags).
template <typename scalar_t, typename acc_t>
void add_shifted(const scalar_t* p, int64_t n, acc_t k, acc_t& a1, acc_t& a2) {
  acc_t l1[8] = {0}, l2[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const acc_t d = static_cast<acc_t>(p[i + j]) - k;
      l1[j] += d;
      l2[j] += d * d;
    }
  }
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - k;
    a1 += d;
    a2 += d * d;
  }
  for (int j = 0; j < 8; ++j) {
    a1 += l1[j];
    a2 += l2[j];
  }
}

#if HALODIFF_CPU_SIMD
// float32 on AVX2+FMA: 4 x 8 lanes per sum, then the portable tail.
HALODIFF_AVX2 void add_shifted_avx2(const float* p, int64_t n, float k, float& a1, float& a2) {
  const __m256 vk = _mm256_set1_ps(k);
  __m256 s[4], q[4];
  for (int j = 0; j < 4; ++j) s[j] = q[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 4; ++j) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(p + i + 8 * j), vk);
      s[j] = _mm256_add_ps(s[j], d);
      q[j] = _mm256_fmadd_ps(d, d, q[j]);
    }
  }
  a1 += simd::hsum(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
  a2 += simd::hsum(_mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3])));
  add_shifted(p + i, n - i, k, a1, a2);
}

HALODIFF_AVX2 void channel_accumulate_avx2(const float* row, int64_t n, const float* k, float* s1, float* s2) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(k + c));
    _mm256_storeu_ps(s1 + c, _mm256_add_ps(_mm256_loadu_ps(s1 + c), d));
    _mm256_storeu_ps(s2 + c, _mm256_fmadd_ps(d, d, _mm256_loadu_ps(s2 + c)));
  }
  for (; c < n; ++c) {
    const float d = row[c] - k[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

HALODIFF_AVX2 void scale_shift_avx2(const float* src, float* dst, int64_t n, float sc, float sh, bool silu) {
  const __m256 vs = _mm256_set1_ps(sc), vh = _mm256_set1_ps(sh);
  int64_t i = 0;
  if (silu) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, simd::silu(_mm256_fmadd_ps(_mm256_loadu_ps(src + i), vs, vh)));
  } else {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_fmadd_ps(_mm256_loadu_ps(src + i), vs, vh));
  }
  for (; i < n; ++i) {
    const float y = src[i] * sc + sh;
    dst[i] = silu ? y / (1.f + std::exp(-y)) : y;
  }
}

HALODIFF_AVX2 void row_affine_avx2(const float* src, float* dst, int64_t n, const float* sc, const float* sh,
                                   bool silu) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = _mm256_fmadd_ps(_mm256_loadu_ps(src + i), _mm256_loadu_ps(sc + i), _mm256_loadu_ps(sh + i));
    _mm256_storeu_ps(dst + i, silu ? simd::silu(y) : y);
  }
  for (; i < n; ++i) {
    const float y = src[i] * sc[i] + sh[i];
    dst[i] = silu ? y / (1.f + std::exp(-y)) : y;
  }
}
#endif

template <typename scalar_t, typename acc_t>
void shifted(const scalar_t* p, int64_t n, acc_t k, acc_t& a1, acc_t& a2) {
#if HALODIFF_CPU_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::cpu_has_avx2_fma()) return add_shifted_avx2(p, n, k, a1, a2);
  }
#endif
  add_shifted(p, n, k, a1, a2);
}

// NCHW: float64 (Σx, Σx²) of the contiguous group bg, one shifted block of ~kBlock elements at a time.
template <typename scalar_t>
void group_sums(const GroupInput& in, const scalar_t* base, int64_t bg, double& sum, double& sumsq) {
  using acc_t = at::opmath_type<scalar_t>;
  sum = sumsq = 0;
  const scalar_t* p = base + bg * in.group_numel();
  for (int64_t i0 = 0; i0 < in.group_numel(); i0 += kBlock) {
    const int64_t n = std::min(kBlock, in.group_numel() - i0);
    const acc_t k = static_cast<acc_t>(p[i0]);
    acc_t a1 = 0, a2 = 0;
    shifted(p + i0, n, k, a1, a2);
    unshift_sums(a1, a2, static_cast<double>(n), k, sum, sumsq);
  }
}

// s1[c] += row[c] - k[c], s2[c] += (row[c] - k[c])^2 along one channels_last row (vectorises over c).
template <typename scalar_t, typename acc_t>
void channel_accumulate(const scalar_t* row, int64_t n, const acc_t* k, acc_t* s1, acc_t* s2) {
#if HALODIFF_CPU_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::cpu_has_avx2_fma()) return channel_accumulate_avx2(row, n, k, s1, s2);
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    const acc_t d = static_cast<acc_t>(row[c]) - k[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

constexpr int64_t kRows = 256;  // channels_last rows per shifted block

// channels_last: float64 (Σx, Σx²) of every (b, g) into sums[B*G*2]. Task (b, chunk of kRows rows) keeps
// per-channel sums shifted by the chunk's first row, unshifts them per channel into the chunk's group partials;
// chunks are added in order (deterministic).
template <typename scalar_t>
void nhwc_sums(const GroupInput& in, const scalar_t* x, double* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = std::max<int64_t>(1, std::min(in.HW, kRows)), n_chunks = (in.HW + rows - 1) / rows;
  std::vector<double> part(in.B * n_chunks * in.G * 2, 0.0);
  at::parallel_for(0, in.B * n_chunks, grain(rows * in.C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k(in.C), s1(in.C), s2(in.C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / n_chunks, r0 = t % n_chunks * rows, r1 = std::min(in.HW, r0 + rows);
      const scalar_t* first = x + (b * in.HW + r0) * in.C;
      for (int64_t c = 0; c < in.C; ++c) {
        k[c] = static_cast<acc_t>(first[c]);
        s1[c] = s2[c] = 0;
      }
      for (int64_t r = r0; r < r1; ++r) channel_accumulate(x + (b * in.HW + r) * in.C, in.C, k.data(), s1.data(), s2.data());
      double* p = part.data() + t * in.G * 2;
      for (int64_t c = 0; c < in.C; ++c)
        unshift_sums(s1[c], s2[c], static_cast<double>(r1 - r0), k[c], p[2 * (c / in.cpg)], p[2 * (c / in.cpg) + 1]);
    }
  });
  for (int64_t b = 0; b < in.B; ++b) {
    for (int64_t g = 0; g < in.G; ++g) {
      double s1 = 0, s2 = 0;
      for (int64_t ch = 0; ch < n_chunks; ++ch) {
        s1 += part[((b * n_chunks + ch) * in.G + g) * 2];
        s2 += part[((b * n_chunks + ch) * in.G + g) * 2 + 1];
      }
      sums[(b * in.G + g) * 2] = s1;
      sums[(b * in.G + g) * 2 + 1] = s2;
    }
  }
}

// y = x * sc + sh (then SiLU) for n elements, in the opmath type (float64 stays float64).
template <typename scalar_t>
void plane_affine(const scalar_t* src, scalar_t* dst, int64_t n, double sc_d, double sh_d, bool silu) {
  using acc_t = at::opmath_type<scalar_t>;
#if HALODIFF_CPU_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::cpu_has_avx2_fma())
      return scale_shift_avx2(src, dst, n, static_cast<float>(sc_d), static_cast<float>(sh_d), silu);
  }
#endif
  const acc_t sc = static_cast<acc_t>(sc_d), sh = static_cast<acc_t>(sh_d);
  for (int64_t i = 0; i < n; ++i) {
    acc_t y = static_cast<acc_t>(src[i]) * sc + sh;
    if (silu) y = y / (acc_t(1) + std::exp(-y));
    dst[i] = static_cast<scalar_t>(y);
  }
}

// y[c] = x[c] * sc[c] + sh[c] (then SiLU) along one channels_last row.
template <typename scalar_t, typename acc_t>
void row_affine(const scalar_t* src, scalar_t* dst, int64_t n, const acc_t* sc, const acc_t* sh, bool silu) {
#if HALODIFF_CPU_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::cpu_has_avx2_fma()) return row_affine_avx2(src, dst, n, sc, sh, silu);
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    acc_t y = static_cast<acc_t>(src[i]) * sc[i] + sh[i];
    if (silu) y = y / (acc_t(1) + std::exp(-y));
    dst[i] = static_cast<scalar_t>(y);
  }
}

// The whole op: sums where needed (written to `local` when defined), moments from `src`, the affine pass.
template <typename scalar_t>
void group_norm_kernel(const GroupInput& in, at::Tensor& out, const ParamRef& w, const ParamRef& b,
                       const StatsSource& src, bool silu, double* local) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t n_bg = in.B * in.G;
  if (!in.channels_last) {
    at::parallel_for(0, n_bg, grain(in.group_numel()), [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        double s1 = 0, s2 = 0;
        if (src.needs_local()) group_sums(in, x, bg, s1, s2);
        if (local != nullptr) {
          local[2 * bg] = s1;
          local[2 * bg + 1] = s2;
        }
        const Moments m = src.moments(bg, s1, s2);
        const int64_t g = bg % in.G;
        for (int64_t c = g * in.cpg; c < (g + 1) * in.cpg; ++c) {
          const double sc = m.rstd * w.at(c, 1.0), sh = b.at(c, 0.0) - m.mean * sc;
          const int64_t off = (bg / in.G * in.C + c) * in.HW;
          plane_affine(x + off, y + off, in.HW, sc, sh, silu);
        }
      }
    });
    return;
  }
  std::vector<double> own;
  if (src.needs_local()) {
    own.resize(n_bg * 2);
    nhwc_sums(in, x, own.data());
    if (local != nullptr) std::copy(own.begin(), own.end(), local);
  }
  std::vector<acc_t> scale(in.B * in.C), shift(in.B * in.C);
  for (int64_t bg = 0; bg < n_bg; ++bg) {
    const Moments m = src.moments(bg, own.empty() ? 0.0 : own[2 * bg], own.empty() ? 0.0 : own[2 * bg + 1]);
    const int64_t bb = bg / in.G, g = bg % in.G;
    for (int64_t c = g * in.cpg; c < (g + 1) * in.cpg; ++c) {
      const double sc = m.rstd * w.at(c, 1.0);
      scale[bb * in.C + c] = static_cast<acc_t>(sc);
      shift[bb * in.C + c] = static_cast<acc_t>(b.at(c, 0.0) - m.mean * sc);
    }
  }
  at::parallel_for(0, in.B * in.HW, grain(in.C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bb = r / in.HW;
      row_affine(x + r * in.C, y + r * in.C, in.C, scale.data() + bb * in.C, shift.data() + bb * in.C, silu);
    }
  });
}

at::Tensor group_stats_cpu(const at::Tensor& x_in, int64_t num_groups) {
  check_group_args(x_in, num_groups);
  const GroupInput in = group_input(x_in, num_groups);
  at::Tensor out = empty_group_sums(in);
  double* o = out.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_stats_cpu", [&] {
    const scalar_t* x = in.x.const_data_ptr<scalar_t>();
    if (in.channels_last) return nhwc_sums(in, x, o);
    at::parallel_for(0, in.B * in.G, grain(in.group_numel()), [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) group_sums(in, x, bg, o[2 * bg], o[2 * bg + 1]);
    });
  });
  return out;
}

at::Tensor group_norm_cpu(const at::Tensor& x_in, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, double eps, bool silu,
                          const c10::optional<at::Tensor>& stats, double count) {
  check_group_norm_args(x_in, num_groups, weight, bias, stats, count);
  const GroupInput in = group_input(x_in, num_groups);
  at::Tensor out = empty_group_output(in);
  if (out.numel() == 0) return out;
  const c10::optional<at::Tensor> st = contiguous_sums(stats);
  const StatsSource src = stats_source(in, st, count, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_norm_cpu", [&] {
    group_norm_kernel<scalar_t>(in, out, param_ref(weight), param_ref(bias), src, silu, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> group_norm_stale_cpu(const at::Tensor& x_in, int64_t num_groups,
                                                        const c10::optional<at::Tensor>& weight,
                                                        const c10::optional<at::Tensor>& bias, double eps, bool silu,
                                                        const at::Tensor& stale_global, const at::Tensor& stale_local,
                                                        double count) {
  check_group_norm_stale_args(x_in, num_groups, weight, bias, stale_global, stale_local, count);
  const GroupInput in = group_input(x_in, num_groups);
  at::Tensor out = empty_group_output(in);
  at::Tensor local = empty_group_sums(in);
  if (local.numel() == 0) return {out, local};
  const at::Tensor sg = stale_global.contiguous(), sl = stale_local.contiguous();
  const StatsSource src = stale_source(in, sg, sl, count, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "group_norm_stale_cpu", [&] {
    group_norm_kernel<scalar_t>(in, out, param_ref(weight), param_ref(bias), src, silu,
                                local.mutable_data_ptr<double>());
  });
  return {out, local};
}

}  // namespace
}  // namespace halodiff

TORCH_LIBRARY_IMPL(halodiff, CPU, m) {
  m.impl("group_stats", &halodiff::group_stats_cpu);
  m.impl("group_norm", &halodiff::group_norm_cpu);
  m.impl("group_norm_stale", &halodiff::group_norm_stale_cpu);
}

// halodiff native ops: TORCH_LIBRARY schemas, shared input checks and the CPU kernels.
// CUDA kernels live in *.cu files and register with TORCH_LIBRARY_IMPL(halodiff, CUDA, m).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "cpu_simd.h"

#include "halodiff.h"

namespace halodiff {

// ----------------------------------------------------------------------------------------
// Checks (messages name the argument and the fix; surfaced to Python as ValueError/TypeError
// by the Python layer, which validates first; these guard direct torch.ops calls).
void check_group_args(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK_VALUE(x.dim() == 4, "halodiff: x must be 4-D [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "halodiff: x must be a floating tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(num_groups > 0, "halodiff: num_groups must be positive, got ", num_groups);
  TORCH_CHECK_VALUE(x.size(1) % num_groups == 0, "halodiff: channels (", x.size(1),
                    ") must be divisible by num_groups (", num_groups, ")");
}

void check_affine(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == x.size(1), "halodiff: ", name,
                    " must have shape [C] = [", x.size(1), "], got ", p->sizes());
  TORCH_CHECK_VALUE(p->device() == x.device(), "halodiff: ", name, " is on ", p->device(), " but x is on ",
                    x.device());
}

void check_stats(const c10::optional<at::Tensor>& stats, const at::Tensor& x, int64_t num_groups, double count) {
  if (!stats.has_value() || !stats->defined()) return;
  const auto& s = *stats;
  TORCH_CHECK_VALUE(s.dim() == 3 && s.size(0) == x.size(0) && s.size(1) == num_groups && s.size(2) == 2,
                    "halodiff: stats must have shape [B, G, 2] = [", x.size(0), ", ", num_groups, ", 2], got ",
                    s.sizes());
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || (s.scalar_type() == at::kDouble && x.scalar_type() == at::kDouble),
                   "halodiff: stats must be float32 (or float64 for a float64 x), got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == x.device(), "halodiff: stats is on ", s.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(count > 0, "halodiff: count (elements per group covered by stats) must be > 0, got ", count);
}

std::vector<HaloSegment> halo_plan(at::TensorList tensors, at::IntArrayRef top, at::IntArrayRef bottom,
                                   int64_t* total) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK_VALUE(n > 0, "halodiff: halo_pack needs a non-empty list of tensors");
  TORCH_CHECK_VALUE(top.size() == 1 || static_cast<int64_t>(top.size()) == n,
                    "halodiff: top must have 1 or len(tensors)=", n, " entries, got ", top.size());
  TORCH_CHECK_VALUE(bottom.size() == 1 || static_cast<int64_t>(bottom.size()) == n,
                    "halodiff: bottom must have 1 or len(tensors)=", n, " entries, got ", bottom.size());
  std::vector<HaloSegment> plan(n);
  int64_t offset = 0;
  for (int pass = 0; pass < 2; ++pass) {  // pass 0 lays out the tops, pass 1 the bottoms
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& t = tensors[i];
      HaloSegment& s = plan[i];
      if (pass == 0) {
        TORCH_CHECK_VALUE(t.dim() >= 2, "halodiff: tensors[", i, "] must have >= 2 dims (rows = dim -2), got ",
                          t.sizes());
        TORCH_CHECK_TYPE(t.scalar_type() == tensors[0].scalar_type(), "halodiff: tensors[", i, "] has dtype ",
                         t.scalar_type(), " but tensors[0] has ", tensors[0].scalar_type());
        TORCH_CHECK_VALUE(t.device() == tensors[0].device(), "halodiff: tensors[", i, "] is on ", t.device(),
                          " but tensors[0] is on ", tensors[0].device());
        s.top = top.size() == 1 ? top[0] : top[i];
        s.bottom = bottom.size() == 1 ? bottom[0] : bottom[i];
        s.rows = t.size(-2);
        s.row_len = t.size(-1);
        TORCH_CHECK_VALUE(s.top >= 0 && s.bottom >= 0 && s.top + s.bottom <= s.rows, "halodiff: tensors[", i,
                          "] has ", s.rows, " rows; top=", s.top, " and bottom=", s.bottom,
                          " must be >= 0 with top + bottom <= rows");
        s.outer = 1;
        for (int64_t d = 0; d < t.dim() - 2; ++d) s.outer *= t.size(d);
        s.src = t.data_ptr();
        s.stride_row = t.stride(-2);
        // Leading dims must flatten to one stride and the last dim must be dense; the Python
        // layer makes other layouts contiguous before calling in.
        bool ok = t.size(-1) <= 1 || t.stride(-1) == 1;
        int64_t expect = -1;
        for (int64_t d = t.dim() - 3; d >= 0; --d) {
          if (t.size(d) == 1) continue;
          if (expect >= 0 && t.stride(d) != expect) ok = false;
          if (expect < 0) s.stride_outer = t.stride(d);
          expect = t.stride(d) * t.size(d);
        }
        if (expect < 0) s.stride_outer = s.rows * s.row_len;
        TORCH_CHECK_VALUE(ok, "halodiff: tensors[", i, "] has an unsupported layout (strides ", t.strides(),
                          "); pass t.contiguous()");
        s.top_offset = offset;
        offset += s.outer * s.top * s.row_len;
      } else {
        s.bottom_offset = offset;
        offset += s.outer * s.bottom * s.row_len;
      }
    }
  }
  *total = offset;
  return plan;
}

void check_pack_out(const at::Tensor& out, at::TensorList tensors, int64_t total) {
  TORCH_CHECK_VALUE(out.dim() == 1 && out.numel() == total && out.is_contiguous(),
                    "halodiff: out must be a contiguous 1-D buffer of ", total, " elements, got shape ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == tensors[0].scalar_type(), "halodiff: out has dtype ", out.scalar_type(),
                   " but the tensors have ", tensors[0].scalar_type());
  TORCH_CHECK_VALUE(out.device() == tensors[0].device(), "halodiff: out is on ", out.device(),
                    " but the tensors are on ", tensors[0].device());
}

void check_group_norm_args(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& stats, double count) {
  check_group_args(x, num_groups);
  check_affine(weight, x, "weight");
  check_affine(bias, x, "bias");
  check_stats(stats, x, num_groups, count);
}

namespace {

// ----------------------------------------------------------------------------------------
// CPU kernels.

// Sum and sum of squares of p[0:n] in opmath precision, accumulated per 2048-element chunk in
// 8 independent lanes (vectorisable without reassociation flags), chunks added in double.
template <typename scalar_t>
void sum_and_squares(const scalar_t* p, int64_t n, double& s1, double& s2) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kChunk = 2048;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t end = std::min(n, i0 + kChunk);
    acc_t a[8] = {0}, b[8] = {0};
    int64_t i = i0;
    for (; i + 8 <= end; i += 8) {
      for (int j = 0; j < 8; ++j) {
        const acc_t v = static_cast<acc_t>(p[i + j]);
        a[j] += v;
        b[j] += v * v;
      }
    }
    acc_t ta = 0, tb = 0;
    for (; i < end; ++i) {
      const acc_t v = static_cast<acc_t>(p[i]);
      ta += v;
      tb += v * v;
    }
    for (int j = 0; j < 8; ++j) {
      ta += a[j];
      tb += b[j];
    }
    s1 += static_cast<double>(ta);
    s2 += static_cast<double>(tb);
  }
}

// y = x * sc + sh (then SiLU) for one channel's n elements, in the opmath type (float64 stays float64).
template <typename scalar_t>
void scale_shift(const scalar_t* src, scalar_t* dst, int64_t n, double sc_d, double sh_d, bool silu) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sc = static_cast<acc_t>(sc_d), sh = static_cast<acc_t>(sh_d);
  for (int64_t i = 0; i < n; ++i) {
    acc_t y = static_cast<acc_t>(src[i]) * sc + sh;
    if (silu) y = y / (acc_t(1) + std::exp(-y));
    dst[i] = static_cast<scalar_t>(y);
  }
}

#if HALODIFF_CPU_SIMD
// float32 on AVX2+FMA: the same 2048-element chunking, 4 x 8 lanes per sum, then the tail.
HALODIFF_AVX2 void sum_and_squares_avx2(const float* p, int64_t n, double& s1, double& s2) {
  constexpr int64_t kChunk = 2048;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t end = std::min(n, i0 + kChunk);
    __m256 a[4], b[4];
    for (int j = 0; j < 4; ++j) a[j] = b[j] = _mm256_setzero_ps();
    int64_t i = i0;
    for (; i + 32 <= end; i += 32) {
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_loadu_ps(p + i + 8 * j);
        a[j] = _mm256_add_ps(a[j], v);
        b[j] = _mm256_fmadd_ps(v, v, b[j]);
      }
    }
    float ta = simd::hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    float tb = simd::hsum(_mm256_add_ps(_mm256_add_ps(b[0], b[1]), _mm256_add_ps(b[2], b[3])));
    for (; i < end; ++i) {
      ta += p[i];
      tb += p[i] * p[i];
    }
    s1 += ta;
    s2 += tb;
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
  scale_shift(src + i, dst + i, n - i, sc, sh, silu);
}
#endif

template <typename scalar_t>
void group_sums(const scalar_t* p, int64_t n, double& s1, double& s2) {
#if HALODIFF_CPU_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::cpu_has_avx2_fma()) return sum_and_squares_avx2(p, n, s1, s2);
  }
#endif
  sum_and_squares(p, n, s1, s2);
}

template <typename scalar_t>
void channel_affine(const scalar_t* src, scalar_t* dst, int64_t n, double sc, double sh, bool silu) {
#if HALODIFF_CPU_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::cpu_has_avx2_fma())
      return scale_shift_avx2(src, dst, n, static_cast<float>(sc), static_cast<float>(sh), silu);
  }
#endif
  scale_shift(src, dst, n, sc, sh, silu);
}

// Tasks of at least ~32K elements, so small tensors stay on one thread.
int64_t group_grain(int64_t group_numel) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, group_numel)); }

at::Tensor group_stats_cpu(const at::Tensor& x_in, int64_t num_groups) {
  check_group_args(x_in, num_groups);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), group_numel = x.numel() / std::max<int64_t>(1, B * num_groups);
  // Sums are float32, or float64 for float64 inputs (their own accumulation precision).
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({B, num_groups, 2}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_stats_cpu", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * num_groups, group_grain(group_numel), [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        double s1 = 0, s2 = 0;
        group_sums(p + bg * group_numel, group_numel, s1, s2);
        if (f64) {
          out.mutable_data_ptr<double>()[2 * bg] = s1;
          out.mutable_data_ptr<double>()[2 * bg + 1] = s2;
        } else {
          out.mutable_data_ptr<float>()[2 * bg] = static_cast<float>(s1);
          out.mutable_data_ptr<float>()[2 * bg + 1] = static_cast<float>(s2);
        }
      }
    });
  });
  return out;
}

// One task per (b, group): its statistics (unless given), then y = x * scale + shift per channel
// with scale = rstd * w, shift = b - mean * scale. The group's second read comes from cache.
at::Tensor group_norm_cpu(const at::Tensor& x_in, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, double eps, bool silu,
                          const c10::optional<at::Tensor>& stats, double count) {
  check_group_norm_args(x_in, num_groups, weight, bias, stats, count);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), cpg = C / num_groups;
  const bool given = stats.has_value() && stats->defined();
  const at::Tensor st = given ? stats->to(at::kDouble).contiguous() : at::Tensor();
  const double n = given ? count : static_cast<double>(cpg * HW);
  const at::Tensor w = (weight.has_value() && weight->defined()) ? weight->to(at::kDouble).contiguous() : at::Tensor();
  const at::Tensor bb = (bias.has_value() && bias->defined()) ? bias->to(at::kDouble).contiguous() : at::Tensor();
  const double* wp = w.defined() ? w.const_data_ptr<double>() : nullptr;
  const double* bp = bb.defined() ? bb.const_data_ptr<double>() : nullptr;
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_cpu", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    scalar_t* q = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * num_groups, group_grain(cpg * HW), [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        double s1 = 0, s2 = 0;
        if (given) {
          s1 = st.const_data_ptr<double>()[2 * bg];
          s2 = st.const_data_ptr<double>()[2 * bg + 1];
        } else {
          group_sums(p + bg * cpg * HW, cpg * HW, s1, s2);
        }
        const double mean = s1 / n, var = std::max(0.0, s2 / n - mean * mean), rstd = 1.0 / std::sqrt(var + eps);
        const int64_t g = bg % num_groups;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          const double sc = rstd * (wp ? wp[c] : 1.0);
          const double sh = (bp ? bp[c] : 0.0) - mean * sc;
          const int64_t off = (bg / num_groups * C + c) * HW;
          channel_affine(p + off, q + off, HW, sc, sh, silu);
        }
      }
    });
  });
  return out;
}

void halo_pack_into_cpu(at::TensorList tensors, at::IntArrayRef top, at::IntArrayRef bottom, const at::Tensor& out) {
  int64_t total = 0;
  const auto plan = halo_plan(tensors, top, bottom, &total);
  check_pack_out(out, tensors, total);
  TORCH_CHECK_VALUE(tensors[0].device().is_cpu(), "halodiff: halo_pack CPU kernel got ", tensors[0].device());
  const int64_t esize = static_cast<int64_t>(out.element_size());
  char* base = static_cast<char*>(out.data_ptr());
  // Work items: (segment, outer index); each copies its top and bottom rows.
  std::vector<int64_t> first(plan.size() + 1, 0);
  for (size_t i = 0; i < plan.size(); ++i) first[i + 1] = first[i] + plan[i].outer;
  at::parallel_for(0, first.back(), 64, [&](int64_t begin, int64_t end) {
    size_t seg = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first[seg + 1]) ++seg;
      const HaloSegment& s = plan[seg];
      const int64_t o = item - first[seg];
      const char* src = static_cast<const char*>(s.src) + o * s.stride_outer * esize;
      const int64_t row_bytes = s.row_len * esize;
      for (int64_t r = 0; r < s.top; ++r)
        std::memcpy(base + (s.top_offset + (o * s.top + r) * s.row_len) * esize, src + r * s.stride_row * esize,
                    row_bytes);
      for (int64_t r = 0; r < s.bottom; ++r)
        std::memcpy(base + (s.bottom_offset + (o * s.bottom + r) * s.row_len) * esize,
                    src + (s.rows - s.bottom + r) * s.stride_row * esize, row_bytes);
    }
  });
}

at::Tensor halo_pack_cpu(at::TensorList tensors, at::IntArrayRef top, at::IntArrayRef bottom) {
  int64_t total = 0;
  halo_plan(tensors, top, bottom, &total);
  at::Tensor out = at::empty({total}, tensors[0].options());
  halo_pack_into_cpu(tensors, top, bottom, out);
  return out;
}

}  // namespace
}  // namespace halodiff

TORCH_LIBRARY(halodiff, m) {
  m.def("group_stats(Tensor x, int num_groups) -> Tensor");
  m.def(
      "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, Tensor? stats, "
      "float count) -> Tensor");
  m.def("halo_pack(Tensor[] tensors, int[] top, int[] bottom) -> Tensor");
  m.def("halo_pack_into(Tensor[] tensors, int[] top, int[] bottom, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(halodiff, CPU, m) {
  m.impl("group_stats", &halodiff::group_stats_cpu);
  m.impl("group_norm", &halodiff::group_norm_cpu);
  m.impl("halo_pack", &halodiff::halo_pack_cpu);
  m.impl("halo_pack_into", &halodiff::halo_pack_into_cpu);
}

// Shared declarations for halodiff's native ops: input checks, the group-norm statistics math
// (host and device), shared by the CPU and the CUDA implementations.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#if defined(__CUDACC__)
#define HALODIFF_HD __host__ __device__ __forceinline__
#else
#define HALODIFF_HD inline
#endif

namespace halodiff {

// Checks shared by the group-norm family (CPU and CUDA).
void check_group_args(const at::Tensor& x, int64_t num_groups);
void check_affine(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* name);
// A float64 [B, G, 2] sums tensor (what group_stats returns) on x's device.
void check_sums(const at::Tensor& s, const at::Tensor& x, int64_t num_groups, const char* name);
void check_stats(const c10::optional<at::Tensor>& stats, const at::Tensor& x, int64_t num_groups, double count);
// All of group_norm's checks: x and num_groups, weight, bias, stats/count.
void check_group_norm_args(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& stats, double count);
// group_norm_stale's checks: x, num_groups, weight, bias, stale_global/stale_local, count.
void check_group_norm_stale_args(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& stale_global,
                                 const at::Tensor& stale_local, double count);

// x as the group-norm kernels read it: a channels_last x in place (NHWC), anything else contiguous (NCHW).
// The output has the same layout.
struct GroupInput {
  at::Tensor x;
  bool channels_last;
  int64_t B, C, HW, G, cpg;  // cpg = channels per group
  int64_t group_numel() const { return cpg * HW; }
};
GroupInput group_input(const at::Tensor& x, int64_t num_groups);
at::Tensor empty_group_output(const GroupInput& in);
at::Tensor empty_group_sums(const GroupInput& in);  // float64 [B, G, 2]
// An optional sums tensor made contiguous (no copy when it already is).
c10::optional<at::Tensor> contiguous_sums(const c10::optional<at::Tensor>& s);

// A per-channel affine parameter (weight or bias) read in its own dtype: no cast kernel.
struct ParamRef {
  const void* ptr = nullptr;
  int64_t stride = 1;
  int kind = 0;  // 0: absent, 1: float16, 2: bfloat16, 3: float32, 4: float64
  HALODIFF_HD double at(int64_t c, double absent) const {
    switch (kind) {
      case 1: return static_cast<float>(static_cast<const c10::Half*>(ptr)[c * stride]);
      case 2: return static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[c * stride]);
      case 3: return static_cast<const float*>(ptr)[c * stride];
      case 4: return static_cast<const double*>(ptr)[c * stride];
      default: return absent;
    }
  }
};
ParamRef param_ref(const c10::optional<at::Tensor>& p);

// Statistics precision. Kernels sum blocks of x in the accumulation type (float32; float64 for float64
// x) shifted by one element K of the block, s1 = Σ(x−K), s2 = Σ(x−K)², so the block sums are of
// values ~std, not ~mean; each block becomes unshifted float64 sums here, and blocks add in float64.
// The float64 (Σx, Σx²) pair stays additive across bands/ranks.
HALODIFF_HD void unshift_sums(double s1, double s2, double n, double k, double& sum, double& sumsq) {
  sum += s1 + n * k;
  sumsq += s2 + k * (2.0 * s1 + n * k);
}

struct Moments {
  double mean, rstd;
};

// Where group_norm's mean/var come from: the group's own sums (`given` and `stale_global` null), external
// sums `given` over `count` elements, or DistriFusion's stale estimate
//   est = stale_global - stale_local + local over `count`; where var(est) < 0 the band's own variance
//   (local over `n_local` = C/G*h*w elements) with est's mean.
// Variances are biased and clamped at 0 (NaN propagates).
struct StatsSource {
  const double* given = nullptr;
  const double* stale_global = nullptr;
  const double* stale_local = nullptr;
  double count = 0, n_local = 0, eps = 0;

  HALODIFF_HD bool needs_local() const { return given == nullptr; }
  // local1/local2: the group's own float64 sums (ignored for given stats).
  HALODIFF_HD Moments moments(int64_t bg, double local1, double local2) const {
    double mean, var;
    if (given != nullptr) {
      mean = given[2 * bg] / count;
      var = given[2 * bg + 1] / count - mean * mean;
    } else if (stale_global != nullptr) {
      mean = (stale_global[2 * bg] - stale_local[2 * bg] + local1) / count;
      var = (stale_global[2 * bg + 1] - stale_local[2 * bg + 1] + local2) / count - mean * mean;
      if (var < 0) {
        const double m = local1 / n_local;
        var = local2 / n_local - m * m;
      }
    } else {
      mean = local1 / n_local;
      var = local2 / n_local - mean * mean;
    }
    var = var < 0 ? 0.0 : var;
    return {mean, 1.0 / sqrt(var + eps)};
  }
};
// The sums tensors must be contiguous (callers pass .contiguous() copies and keep them alive for the launch).
StatsSource stats_source(const GroupInput& in, const c10::optional<at::Tensor>& stats, double count, double eps);
StatsSource stale_source(const GroupInput& in, const at::Tensor& stale_global, const at::Tensor& stale_local,
                         double count, double eps);

// q [B, H, Lq, D] and K/V segments [B, H, Lk_i, D] of one dtype and device; scale finite and > 0.
void check_segmented_attention(const at::Tensor& q, at::TensorList ks, at::TensorList vs, c10::optional<double> scale);

}  // namespace halodiff

// Shared by the CPU and the CUDA kernels (compiled into both halodiff._C and halodiff._C_cuda): input
// checks and the group-norm input/statistics plumbing. No op registration here.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

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

void check_sums(const at::Tensor& s, const at::Tensor& x, int64_t num_groups, const char* name) {
  TORCH_CHECK_VALUE(s.dim() == 3 && s.size(0) == x.size(0) && s.size(1) == num_groups && s.size(2) == 2,
                    "halodiff: ", name, " must have shape [B, G, 2] = [", x.size(0), ", ", num_groups, ", 2], got ",
                    s.sizes());
  TORCH_CHECK_TYPE(s.scalar_type() == at::kDouble, "halodiff: ", name,
                   " must be float64 (group_stats returns float64 sums), got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == x.device(), "halodiff: ", name, " is on ", s.device(), " but x is on ", x.device());
}

void check_stats(const c10::optional<at::Tensor>& stats, const at::Tensor& x, int64_t num_groups, double count) {
  if (!stats.has_value() || !stats->defined()) return;
  check_sums(*stats, x, num_groups, "stats");
  TORCH_CHECK_VALUE(count > 0, "halodiff: count (elements per group covered by stats) must be > 0, got ", count);
}

void check_group_norm_args(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& stats, double count) {
  check_group_args(x, num_groups);
  check_affine(weight, x, "weight");
  check_affine(bias, x, "bias");
  check_stats(stats, x, num_groups, count);
}

void check_group_norm_stale_args(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& stale_global,
                                 const at::Tensor& stale_local, double count) {
  check_group_norm_args(x, num_groups, weight, bias, c10::nullopt, 0.0);
  check_sums(stale_global, x, num_groups, "stale_global");
  check_sums(stale_local, x, num_groups, "stale_local");
  TORCH_CHECK_VALUE(count > 0, "halodiff: count (elements per group covered by stale_global) must be > 0, got ",
                    count);
}

// ----------------------------------------------------------------------------------------
// Group-norm plumbing shared by the CPU and CUDA kernels.

GroupInput group_input(const at::Tensor& x, int64_t num_groups) {
  // channels_last (and not also plain contiguous, e.g. H = W = 1) is read in place; other layouts are
  // made contiguous. reference.out_format and the fake kernels follow the same rule.
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  GroupInput in{cl ? x : x.contiguous(), cl, x.size(0), x.size(1), x.size(2) * x.size(3), num_groups,
                x.size(1) / num_groups};
  return in;
}

at::Tensor empty_group_output(const GroupInput& in) {
  return at::empty_like(in.x, in.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

at::Tensor empty_group_sums(const GroupInput& in) {
  return at::empty({in.B, in.G, 2}, in.x.options().dtype(at::kDouble));
}

c10::optional<at::Tensor> contiguous_sums(const c10::optional<at::Tensor>& s) {
  if (!s.has_value() || !s->defined()) return c10::nullopt;
  return s->contiguous();
}

ParamRef param_ref(const c10::optional<at::Tensor>& p) {
  ParamRef r;
  if (!p.has_value() || !p->defined()) return r;
  r.ptr = p->const_data_ptr();
  r.stride = p->stride(0);
  switch (p->scalar_type()) {
    case at::kHalf: r.kind = 1; break;
    case at::kBFloat16: r.kind = 2; break;
    case at::kFloat: r.kind = 3; break;
    case at::kDouble: r.kind = 4; break;
    default: TORCH_CHECK_TYPE(false, "halodiff: weight/bias must be float16, bfloat16, float32 or float64, got ",
                              p->scalar_type());
  }
  return r;
}

StatsSource stats_source(const GroupInput& in, const c10::optional<at::Tensor>& stats, double count, double eps) {
  StatsSource src;
  src.eps = eps;
  src.n_local = static_cast<double>(in.group_numel());
  if (stats.has_value() && stats->defined()) {
    TORCH_INTERNAL_ASSERT(stats->is_contiguous());
    src.given = stats->const_data_ptr<double>();
    src.count = count;
  }
  return src;
}

StatsSource stale_source(const GroupInput& in, const at::Tensor& stale_global, const at::Tensor& stale_local,
                         double count, double eps) {
  TORCH_INTERNAL_ASSERT(stale_global.is_contiguous() && stale_local.is_contiguous());
  StatsSource src;
  src.eps = eps;
  src.n_local = static_cast<double>(in.group_numel());
  src.stale_global = stale_global.const_data_ptr<double>();
  src.stale_local = stale_local.const_data_ptr<double>();
  src.count = count;
  return src;
}

// Checks of segmented_attention (CPU and CUDA kernels).
void check_segmented_attention(const at::Tensor& q, at::TensorList ks, at::TensorList vs,
                               c10::optional<double> scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "halodiff: q must be 4-D [B, H, Lq, D], got shape ", q.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "halodiff: q must be a floating tensor, got ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(q.size(3) > 0, "halodiff: q must have a head dim D >= 1, got shape ", q.sizes());
  TORCH_CHECK_VALUE(!ks.empty(), "halodiff: ks must be a non-empty list of [B, H, Lk_i, D] key segments");
  TORCH_CHECK_VALUE(ks.size() == vs.size(), "halodiff: ks and vs must have the same length, got ", ks.size(),
                    " and ", vs.size());
  for (size_t i = 0; i < ks.size(); ++i) {
    for (const at::Tensor* t : {&ks[i], &vs[i]}) {
      const char* name = t == &ks[i] ? "ks" : "vs";
      TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == q.size(0) && t->size(1) == q.size(1) &&
                            t->size(3) == q.size(3),
                        "halodiff: ", name, "[", i, "] must have shape [B, H, Lk, D] = [", q.size(0), ", ", q.size(1),
                        ", Lk, ", q.size(3), "], got ", t->sizes());
      TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "halodiff: ", name, "[", i, "] has dtype ",
                       t->scalar_type(), " but q has ", q.scalar_type());
      TORCH_CHECK_VALUE(t->device() == q.device(), "halodiff: ", name, "[", i, "] is on ", t->device(),
                        " but q is on ", q.device());
    }
    TORCH_CHECK_VALUE(ks[i].size(2) == vs[i].size(2), "halodiff: ks[", i, "] has ", ks[i].size(2),
                      " rows but vs[", i, "] has ", vs[i].size(2), "; each K segment needs its V segment");
  }
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0, "halodiff: scale must be a finite number > 0, got ",
                      *scale);
  }
}

}  // namespace halodiff

// halodiff native ops: the TORCH_LIBRARY schemas of every op, shared input checks and the CPU halo pack.
// CUDA kernels live in *.cu files and register with TORCH_LIBRARY_IMPL(halodiff, CUDA, m).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

namespace {

// ----------------------------------------------------------------------------------------
// CPU halo pack (group-norm CPU kernels: group_norm_cpu.cpp; attention: segmented_attention_cpu.cpp).

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

// Every halodiff op schema, in one place. Kernels register per backend with TORCH_LIBRARY_IMPL:
// CPU in group_norm_cpu.cpp, segmented_attention_cpu.cpp and below; CUDA in the .cu files.
TORCH_LIBRARY(halodiff, m) {
  // float64 [B, G, 2] per-group (Σx, Σx²) of x[B, C, H, W] (any float dtype, NCHW or channels_last).
  m.def("group_stats(Tensor x, int num_groups) -> Tensor");
  // GroupNorm (+ SiLU) with the group's own statistics, or float64 `stats` sums over `count` elements.
  m.def(
      "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, Tensor? stats, "
      "float count) -> Tensor");
  // DistriFusion's async GroupNorm: y with the corrected stale estimate, and the band's own sums.
  m.def(
      "group_norm_stale(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
      "Tensor stale_global, Tensor stale_local, float count) -> (Tensor, Tensor)");
  m.def("halo_pack(Tensor[] tensors, int[] top, int[] bottom) -> Tensor");
  m.def("halo_pack_into(Tensor[] tensors, int[] top, int[] bottom, Tensor(a!) out) -> ()");
  m.def("segmented_attention(Tensor q, Tensor[] ks, Tensor[] vs, float? scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(halodiff, CPU, m) {
  m.impl("halo_pack", &halodiff::halo_pack_cpu);
  m.impl("halo_pack_into", &halodiff::halo_pack_into_cpu);
}

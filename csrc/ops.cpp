// halodiff native ops: the TORCH_LIBRARY schemas of every op and the CPU halo pack.
// CPU kernels register in this extension (halodiff._C: here, group_norm_cpu.cpp, segmented_attention_cpu.cpp);
// CUDA kernels live in *.cu files, built into halodiff._C_cuda, and register with TORCH_LIBRARY_IMPL(halodiff, CUDA, m).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "halodiff.h"

namespace halodiff {
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

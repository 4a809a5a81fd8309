// halodiff native ops: the TORCH_LIBRARY schemas of every op.
// CPU kernels register in this extension (halodiff._C: group_norm_cpu.cpp, segmented_attention_cpu.cpp);
// CUDA kernels live in *.cu files, built into halodiff._C_cuda, and register with TORCH_LIBRARY_IMPL(halodiff, CUDA, m).
#include <torch/library.h>

// Every halodiff op schema, in one place. Kernels register per backend with TORCH_LIBRARY_IMPL:
// CPU in group_norm_cpu.cpp and segmented_attention_cpu.cpp; CUDA in the .cu files.
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
  m.def("segmented_attention(Tensor q, Tensor[] ks, Tensor[] vs, float? scale) -> Tensor");
}

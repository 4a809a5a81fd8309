// Shared declarations for halodiff's native ops: input checks and the
// halo-pack plan used by both the CPU and the CUDA implementations.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <vector>

namespace halodiff {

// Checks shared by the group-norm family (CPU and CUDA).
void check_group_args(const at::Tensor& x, int64_t num_groups);
void check_affine(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* name);
void check_stats(const c10::optional<at::Tensor>& stats, const at::Tensor& x, int64_t num_groups, double count);
// All of group_norm's checks: x and num_groups, weight, bias, stats/count.
void check_group_norm_args(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& stats, double count);

// One tensor's part in a halo pack: its first `top` and last `bottom` rows
// (dim -2) are copied to out[top_offset ...] and out[bottom_offset ...].
struct HaloSegment {
  const void* src;      // data pointer of the source tensor
  int64_t outer;        // product of the leading dims (B*C)
  int64_t stride_outer; // elements between consecutive outer indices (outer dims must flatten)
  int64_t stride_row;   // elements between consecutive rows
  int64_t rows;         // h
  int64_t row_len;      // W (innermost dim, stride 1)
  int64_t top, bottom;  // rows to copy from each end
  int64_t top_offset, bottom_offset;  // element offsets in the output buffer
};

// Validates the inputs and computes the packed layout:
// [top rows of t0, top rows of t1, ..., bottom rows of t0, bottom rows of t1, ...].
std::vector<HaloSegment> halo_plan(at::TensorList tensors, at::IntArrayRef top,
                                   at::IntArrayRef bottom, int64_t* total);
void check_pack_out(const at::Tensor& out, at::TensorList tensors, int64_t total);

}  // namespace halodiff

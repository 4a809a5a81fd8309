// CUDA kernel for halodiff::halo_pack / halo_pack_into: copies the first `top` and last `bottom`
// rows of up to kMaxSegs tensors into one flat buffer in a single launch. The segment table is
// passed by value as a kernel parameter (no host-to-device copy); larger lists are split into
// launches of kMaxSegs tensors each.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "halodiff.h"

namespace halodiff {
namespace {

constexpr int kMaxSegs = 96;  // 96 * 72 B ~ 7 KB of kernel parameters (CUDA 12.1+ allows 32 KB)

struct SegParam {
  const char* src;
  char* dst_top;
  char* dst_bottom;
  int64_t stride_outer_b;  // bytes
  int64_t stride_row_b;    // bytes
  int64_t first_row;       // index of this segment's first copied row in the launch's row space
  int32_t top, bottom, rows;
  int32_t row_units;       // row length in copy units
};

struct PackParams {
  SegParam seg[kMaxSegs];
  int32_t n_segs;
  int64_t total_rows;
};

// One warp copies one row (grid-stride over rows). Work row j of segment s maps to
// (outer o, part top/bottom, row r). Reads and writes each copied byte once.
template <typename Unit>
__global__ void halo_pack_kernel(const __grid_constant__ PackParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; row < p.total_rows;
       row += warps) {
    int lo = 0, hi = p.n_segs - 1;  // last segment with first_row <= row
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.seg[mid].first_row <= row) lo = mid; else hi = mid - 1;
    }
    const SegParam& s = p.seg[lo];
    const int64_t j = row - s.first_row, per_outer = s.top + s.bottom;
    const int64_t o = j / per_outer;
    const int64_t r = j % per_outer;
    const char* src;
    char* dst;
    if (r < s.top) {
      src = s.src + o * s.stride_outer_b + r * s.stride_row_b;
      dst = s.dst_top + (o * s.top + r) * static_cast<int64_t>(s.row_units) * sizeof(Unit);
    } else {
      const int64_t rb = r - s.top;
      src = s.src + o * s.stride_outer_b + (s.rows - s.bottom + rb) * s.stride_row_b;
      dst = s.dst_bottom + (o * s.bottom + rb) * static_cast<int64_t>(s.row_units) * sizeof(Unit);
    }
    const Unit* su = reinterpret_cast<const Unit*>(src);
    Unit* du = reinterpret_cast<Unit*>(dst);
    for (int u = lane; u < s.row_units; u += 32) du[u] = su[u];
  }
}

void halo_pack_into_cuda(at::TensorList tensors, at::IntArrayRef top, at::IntArrayRef bottom, const at::Tensor& out) {
  int64_t total = 0;
  const auto plan = halo_plan(tensors, top, bottom, &total);
  check_pack_out(out, tensors, total);
  TORCH_CHECK_VALUE(out.is_cuda(), "halodiff: halo_pack CUDA kernel got ", out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t esize = static_cast<int64_t>(out.element_size());
  char* base = static_cast<char*>(out.data_ptr());
  // Largest copy unit (16/8/4/2/1 bytes) that divides every row and aligns every address.
  int unit = 16;
  auto fits = [&](int64_t v) { return v % unit == 0; };
  for (const auto& s : plan) {
    while (unit > 1 &&
           !(fits(s.row_len * esize) && fits(reinterpret_cast<uintptr_t>(s.src)) && fits(s.stride_outer * esize) &&
             fits(s.stride_row * esize) && fits(reinterpret_cast<uintptr_t>(base + s.top_offset * esize)) &&
             fits(reinterpret_cast<uintptr_t>(base + s.bottom_offset * esize))))
      unit /= 2;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  for (size_t start = 0; start < plan.size(); start += kMaxSegs) {
    PackParams p{};
    p.n_segs = 0;
    int64_t rows = 0;
    for (size_t i = start; i < std::min(plan.size(), start + kMaxSegs); ++i) {
      const HaloSegment& s = plan[i];
      const int64_t n_rows = s.outer * (s.top + s.bottom);
      if (n_rows == 0 || s.row_len == 0) continue;
      SegParam& q = p.seg[p.n_segs++];
      q.src = static_cast<const char*>(s.src);
      q.dst_top = base + s.top_offset * esize;
      q.dst_bottom = base + s.bottom_offset * esize;
      q.stride_outer_b = s.stride_outer * esize;
      q.stride_row_b = s.stride_row * esize;
      q.first_row = rows;
      q.top = static_cast<int32_t>(s.top);
      q.bottom = static_cast<int32_t>(s.bottom);
      q.rows = static_cast<int32_t>(s.rows);
      q.row_units = static_cast<int32_t>(s.row_len * esize / unit);
      rows += n_rows;
    }
    if (rows == 0) continue;
    p.total_rows = rows;
    const int warps_per_block = 8;
    const int blocks = static_cast<int>(std::min<int64_t>((rows + warps_per_block - 1) / warps_per_block, 32LL * sms));
    switch (unit) {
      case 16: halo_pack_kernel<int4><<<blocks, 32 * warps_per_block, 0, stream>>>(p); break;
      case 8: halo_pack_kernel<int2><<<blocks, 32 * warps_per_block, 0, stream>>>(p); break;
      case 4: halo_pack_kernel<int32_t><<<blocks, 32 * warps_per_block, 0, stream>>>(p); break;
      case 2: halo_pack_kernel<int16_t><<<blocks, 32 * warps_per_block, 0, stream>>>(p); break;
      default: halo_pack_kernel<int8_t><<<blocks, 32 * warps_per_block, 0, stream>>>(p); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor halo_pack_cuda(at::TensorList tensors, at::IntArrayRef top, at::IntArrayRef bottom) {
  int64_t total = 0;
  halo_plan(tensors, top, bottom, &total);
  at::Tensor out = at::empty({total}, tensors[0].options());
  halo_pack_into_cuda(tensors, top, bottom, out);
  return out;
}

}  // namespace
}  // namespace halodiff

TORCH_LIBRARY_IMPL(halodiff, CUDA, m) {
  m.impl("halo_pack", &halodiff::halo_pack_cuda);
  m.impl("halo_pack_into", &halodiff::halo_pack_into_cuda);
}

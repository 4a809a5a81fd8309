// halodiff::segmented_attention: schema, argument checks (shared with the CUDA kernel) and the CPU kernels.
//
//   out = softmax(q·Kᵀ·scale)·V, K = cat(ks, dim=2), V = cat(vs, dim=2), without building K or V.
//
// float32/float16/bfloat16 on x86-64 CPUs with AVX2+FMA (checked at run time): one online-softmax pass
// (flash-attention forward) that walks the segments. A task = one (b, h) and kMq query rows; it packs its
// query rows once (scaled by scale·log2 e, as float32), then for every kNk-row block of every segment packs
// Kᵀ and V (float32, zero-padded to a multiple of 8 columns) into per-thread scratch, computes the score
// block S = Q·Kᵀ (6x16 FMA micro-tiles), turns it into probabilities with the running row max/sum
// (vectorised exp2), rescales and accumulates O += P·V, and finally writes O / rowsum once. Reads every
// K/V element once per task (kMq query rows share it) and writes the output once; fp16/bf16 are converted
// while packing and rounded once at the end.
//
// Elsewhere (float64, CPUs without AVX2, and float32 where torch's own CPU kernels run AVX-512): per
// non-empty segment i, torch's CPU flash attention gives the segment-local output o_i and log-sum-exp lse_i,
// merged exactly: out = Σ_i exp(lse_i - lse) · o_i with lse = log Σ_i exp(lse_i) (the merge reads each o_i
// once and writes out once). torch compiles its flash attention for AVX-512 where the CPU has it; there it
// is ~1.6x faster than the 8-wide fused kernel (float32, SD1.5 64x64 PCPP shape, Xeon, 1 thread: 150 vs
// 235 ms), while on AVX2-only CPUs the fused kernel is the faster one (1.13x on an AMD EPYC). The env
// variable HALODIFF_CPU_ATTENTION=fused|flash forces one path (tests, benchmarks).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "halodiff.h"

#define HALODIFF_CPU_FUSED_ATTENTION HALODIFF_CPU_SIMD

namespace halodiff {

namespace {

#if HALODIFF_CPU_FUSED_ATTENTION
// ----------------------------------------------------------------------------------------
// Fused single-pass kernel (AVX2 + FMA, float32 arithmetic).

using simd::cpu_has_avx2_fma;
using simd::exp2_nonpositive;
using simd::hmax;
using simd::hsum;

constexpr int kMq = 256;  // query rows per task (they share every packed K/V block)
constexpr int kNk = 128;  // keys per block (S block: kMq x kNk floats of scratch)
constexpr int kRt = 6;    // query rows per micro-tile (6 x 16: 12 accumulators)

// dst[c][r] = src[r][c] for an 8x8 block (src rows ld_src floats apart, dst rows ld_dst apart).
HALODIFF_AVX2 inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  const __m256 u0 = _mm256_shuffle_ps(t[0], t[2], 0x44), u1 = _mm256_shuffle_ps(t[0], t[2], 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t[1], t[3], 0x44), u3 = _mm256_shuffle_ps(t[1], t[3], 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t[4], t[6], 0x44), u5 = _mm256_shuffle_ps(t[4], t[6], 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t[5], t[7], 0x44), u7 = _mm256_shuffle_ps(t[5], t[7], 0xEE);
  _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// S[r][j] = Σ_d Q[r][d] · Kt[d][j] for R rows (Q rows dq apart, S rows kNk apart), j < nkp (multiple of 16).
template <int R>
HALODIFF_AVX2 inline void score_rows(const float* Q, int dq, const float* Kt, float* S, int nkp) {
  for (int j = 0; j < nkp; j += 16) {
    __m256 c0[R], c1[R];
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
    for (int d = 0; d < dq; ++d) {
      const __m256 k0 = _mm256_loadu_ps(Kt + d * kNk + j), k1 = _mm256_loadu_ps(Kt + d * kNk + j + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(Q + r * dq + d);
        c0[r] = _mm256_fmadd_ps(a, k0, c0[r]);
        c1[r] = _mm256_fmadd_ps(a, k1, c1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(S + r * kNk + j, c0[r]);
      _mm256_storeu_ps(S + r * kNk + j + 8, c1[r]);
    }
  }
}

// O[r][:dq] += Σ_j P[r][j] · V[j][:dq] for R rows, j < nkp; dq is a multiple of 8 (16-wide tiles + an 8 tail).
template <int R>
HALODIFF_AVX2 inline void accumulate_rows(const float* P, const float* V, int dq, float* O, int nkp) {
  int d = 0;
  for (; d + 16 <= dq; d += 16) {
    __m256 c0[R], c1[R];
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm256_loadu_ps(O + r * dq + d);
      c1[r] = _mm256_loadu_ps(O + r * dq + d + 8);
    }
    for (int j = 0; j < nkp; ++j) {
      const __m256 v0 = _mm256_loadu_ps(V + j * dq + d), v1 = _mm256_loadu_ps(V + j * dq + d + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(P + r * kNk + j);
        c0[r] = _mm256_fmadd_ps(a, v0, c0[r]);
        c1[r] = _mm256_fmadd_ps(a, v1, c1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(O + r * dq + d, c0[r]);
      _mm256_storeu_ps(O + r * dq + d + 8, c1[r]);
    }
  }
  if (d < dq) {
    __m256 c0[R];
    for (int r = 0; r < R; ++r) c0[r] = _mm256_loadu_ps(O + r * dq + d);
    for (int j = 0; j < nkp; ++j) {
      const __m256 v0 = _mm256_loadu_ps(V + j * dq + d);
      for (int r = 0; r < R; ++r) c0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(P + r * kNk + j), v0, c0[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(O + r * dq + d, c0[r]);
  }
}

// Runs F<R> on rows [0, rows) in tiles of kRt rows and one remainder tile.
template <template <int> class F, typename... Args>
HALODIFF_AVX2 inline void by_row_tiles(int rows, Args... args) {
  int i = 0;
  for (; i + kRt <= rows; i += kRt) F<kRt>::run(i, args...);
  switch (rows - i) {
    case 5: F<5>::run(i, args...); break;
    case 4: F<4>::run(i, args...); break;
    case 3: F<3>::run(i, args...); break;
    case 2: F<2>::run(i, args...); break;
    case 1: F<1>::run(i, args...); break;
    default: break;
  }
}
template <int R>
struct ScoreTile {
  HALODIFF_AVX2 static void run(int i, const float* Q, int dq, const float* Kt, float* S, int nkp) {
    score_rows<R>(Q + i * dq, dq, Kt, S + i * kNk, nkp);
  }
};
template <int R>
struct AccumulateTile {
  HALODIFF_AVX2 static void run(int i, const float* P, const float* V, int dq, float* O, int nkp) {
    accumulate_rows<R>(P + i * kNk, V, dq, O + i * dq, nkp);
  }
};

// Online softmax of rows < rows over columns < nk (nk..nkp is padding): S becomes P = 2^(S - m_new),
// the row max m and sum l are updated and the row of O is rescaled by 2^(m_old - m_new).
HALODIFF_AVX2 void softmax_rows(float* S, int rows, int nk, int nkp, float* m, float* l, float* O, int dq) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < rows; ++i) {
    float* s = S + i * kNk;
    std::fill(s + nk, s + nkp, ninf);
    __m256 mv = _mm256_set1_ps(ninf);
    for (int j = 0; j < nkp; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    const float m_new = std::max(m[i], hmax(mv));
    const __m256 mb = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < nkp; j += 8) {
      const __m256 p = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), mb));
      _mm256_storeu_ps(s + j, p);
      sum = _mm256_add_ps(sum, p);
    }
    const float alpha = std::exp2(m[i] - m_new);  // 0 for the first block (m = -inf)
    l[i] = l[i] * alpha + hsum(sum);
    m[i] = m_new;
    if (alpha != 1.f) {
      const __m256 ab = _mm256_set1_ps(alpha);
      float* o = O + i * dq;
      for (int d = 0; d < dq; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), ab));
    }
  }
}

struct FusedScratch {
  std::vector<float> q, kt, v, s, o, m, l;
  explicit FusedScratch(int dq)
      : q(kMq * dq), kt(static_cast<size_t>(dq) * kNk), v(static_cast<size_t>(kNk) * dq), s(kMq * kNk),
        o(kMq * dq), m(kMq), l(kMq) {}
};

// One task: query rows [m0, m0 + rows) of head (b, h) against every segment. Reads those q rows, every
// K/V row of (b, h) once; writes the output rows once.
template <typename T>
HALODIFF_AVX2 void fused_task(const at::Tensor& q, at::TensorList ks, at::TensorList vs, at::Tensor& out, int64_t b,
                              int64_t h, int64_t m0, int rows, float q_scale, FusedScratch& w) {
  const int D = static_cast<int>(q.size(3)), dq = (D + 7) / 8 * 8;
  std::fill(w.q.begin(), w.q.end(), 0.f);
  const T* qb = q.const_data_ptr<T>() + b * q.stride(0) + h * q.stride(1) + m0 * q.stride(2);
  for (int i = 0; i < rows; ++i) {
    const T* src = qb + i * q.stride(2);
    for (int d = 0; d < D; ++d) w.q[i * dq + d] = static_cast<float>(src[d]) * q_scale;
  }
  std::fill(w.o.begin(), w.o.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.f);
  for (size_t seg = 0; seg < ks.size(); ++seg) {
    const int64_t len = ks[seg].size(2), kl = ks[seg].stride(2), vl = vs[seg].stride(2);
    const T* kb = ks[seg].const_data_ptr<T>() + b * ks[seg].stride(0) + h * ks[seg].stride(1);
    const T* vb = vs[seg].const_data_ptr<T>() + b * vs[seg].stride(0) + h * vs[seg].stride(1);
    for (int64_t n0 = 0; n0 < len; n0 += kNk) {
      const int nk = static_cast<int>(std::min<int64_t>(kNk, len - n0)), nkp = (nk + 15) / 16 * 16;
      // Kt[d][j] = K[n0 + j][d], zero for d >= D or j >= nk.
      float* kt = w.kt.data();
      int j0 = 0;
      if constexpr (std::is_same_v<T, float>) {
        for (; j0 + 8 <= nk; j0 += 8) {
          int d = 0;
          for (; d + 8 <= D; d += 8) transpose8x8(kb + (n0 + j0) * kl + d, kl, kt + d * kNk + j0, kNk);
          for (; d < D; ++d)
            for (int j = j0; j < j0 + 8; ++j) kt[d * kNk + j] = kb[(n0 + j) * kl + d];
        }
      }
      for (int j = j0; j < nk; ++j) {
        const T* kr = kb + (n0 + j) * kl;
        for (int d = 0; d < D; ++d) kt[d * kNk + j] = static_cast<float>(kr[d]);
      }
      for (int d = 0; d < dq; ++d) std::fill(kt + d * kNk + (d < D ? nk : 0), kt + d * kNk + nkp, 0.f);
      // V[j][d] = V[n0 + j][d], zero for d >= D or j >= nk.
      for (int j = 0; j < nkp; ++j) {
        float* row = w.v.data() + j * dq;
        const int dd = j < nk ? D : 0;
        for (int d = 0; d < dd; ++d) row[d] = static_cast<float>(vb[(n0 + j) * vl + d]);
        std::fill(row + dd, row + dq, 0.f);
      }
      by_row_tiles<ScoreTile>(rows, static_cast<const float*>(w.q.data()), dq, static_cast<const float*>(kt),
                              w.s.data(), nkp);
      softmax_rows(w.s.data(), rows, nk, nkp, w.m.data(), w.l.data(), w.o.data(), dq);
      by_row_tiles<AccumulateTile>(rows, static_cast<const float*>(w.s.data()), static_cast<const float*>(w.v.data()),
                                   dq, w.o.data(), nkp);
    }
  }
  T* ob = out.mutable_data_ptr<T>() + b * out.stride(0) + h * out.stride(1) + m0 * out.stride(2);
  for (int i = 0; i < rows; ++i) {
    const float inv = w.l[i] > 0.f ? 1.f / w.l[i] : 0.f;
    T* dst = ob + i * out.stride(2);
    for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(w.o[i * dq + d] * inv);
  }
}

template <typename T>
void fused_attention(const at::Tensor& q, at::TensorList ks, at::TensorList vs, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), m_blocks = (Lq + kMq - 1) / kMq;
  const int dq = static_cast<int>((q.size(3) + 7) / 8 * 8);
  const float q_scale = static_cast<float>(scale * 1.4426950408889634);  // scores in base-2 units
  at::parallel_for(0, B * H * m_blocks, 1, [&](int64_t begin, int64_t end) {
    FusedScratch w(dq);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / m_blocks, m0 = (t % m_blocks) * kMq;
      fused_task<T>(q, ks, vs, out, bh / H, bh % H, m0, static_cast<int>(std::min<int64_t>(kMq, Lq - m0)), q_scale,
                    w);
    }
  });
}
#endif  // HALODIFF_CPU_FUSED_ATTENTION

// ----------------------------------------------------------------------------------------
// Portable path: torch's CPU flash attention per segment, merged with the log-sum-exps.

// Merge per-segment flash outputs: for every (b, h, l) row, out = Σ_i w_i · o_i / Σ_i w_i with
// w_i = exp(lse_i - max_j lse_j). Rows are walked in the output's [B, Lq, H] order (its memory order).
template <typename out_t, typename acc_t>
void merge_segments(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& lses, at::Tensor& out) {
  const int64_t B = out.size(0), H = out.size(1), Lq = out.size(2), D = out.size(3);
  const size_t n = outs.size();
  std::vector<const acc_t*> op(n), lp(n);
  std::vector<std::array<int64_t, 3>> os(n), ls(n);
  for (size_t i = 0; i < n; ++i) {
    op[i] = outs[i].const_data_ptr<acc_t>();
    lp[i] = lses[i].const_data_ptr<acc_t>();
    os[i] = {outs[i].stride(0), outs[i].stride(1), outs[i].stride(2)};
    ls[i] = {lses[i].stride(0), lses[i].stride(1), lses[i].stride(2)};
  }
  out_t* dst = out.mutable_data_ptr<out_t>();
  const int64_t ob = out.stride(0), oh = out.stride(1), ol = out.stride(2);
  // Rows per task: enough that a task reads >= ~16K elements (small calls stay on one thread).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D * static_cast<int64_t>(n)));
  at::parallel_for(0, B * Lq * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D), w(n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (Lq * H), l = (r / H) % Lq, h = r % H;
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (size_t i = 0; i < n; ++i) {
        w[i] = lp[i][b * ls[i][0] + h * ls[i][1] + l * ls[i][2]];
        mx = std::max(mx, w[i]);
      }
      acc_t total = 0;
      for (size_t i = 0; i < n; ++i) {
        w[i] = std::exp(w[i] - mx);
        total += w[i];
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (size_t i = 0; i < n; ++i) {
        const acc_t* src = op[i] + b * os[i][0] + h * os[i][1] + l * os[i][2];
        const acc_t wi = w[i] / total;
        for (int64_t d = 0; d < D; ++d) acc[d] += wi * src[d];
      }
      out_t* o = dst + b * ob + h * oh + l * ol;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(acc[d]);
    }
  });
}

// HALODIFF_CPU_ATTENTION: nullptr (unset: automatic), "fused" or "flash"; anything else is an error (checked on
// every platform, also where the fused kernel is not compiled).
const char* forced_cpu_path() {
  const char* env = std::getenv("HALODIFF_CPU_ATTENTION");
  if (env == nullptr || *env == '\0') return nullptr;
  TORCH_CHECK_VALUE(std::strcmp(env, "fused") == 0 || std::strcmp(env, "flash") == 0,
                    "halodiff: HALODIFF_CPU_ATTENTION must be 'fused', 'flash' or unset; got '", env, "'");
  return env;
}

#if HALODIFF_CPU_FUSED_ATTENTION
// Whether the fused AVX2 kernel runs for q's dtype (see the header comment): `forced` decides if set, else
// float32 takes torch's flash attention where torch's CPU kernels are AVX-512.
bool use_fused_kernel(at::ScalarType dtype, const char* forced) {
  if (dtype == at::kDouble || !cpu_has_avx2_fma()) return false;
  if (forced != nullptr) return std::strcmp(forced, "fused") == 0;
  static const bool torch_avx512 = at::get_cpu_capability() == "AVX512";
  return !(dtype == at::kFloat && torch_avx512);
}
#endif

at::Tensor segmented_attention_cpu(const at::Tensor& q_in, at::TensorList ks, at::TensorList vs,
                                   c10::optional<double> scale) {
  check_segmented_attention(q_in, ks, vs, scale);
  [[maybe_unused]] const char* forced = forced_cpu_path();  // validated on every platform
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), "halodiff: segmented_attention CPU kernel got q on ", q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  // Output: a [B, H, Lq, D] view of a contiguous [B, Lq, H, D] buffer (like torch's SDPA).
  at::Tensor out = at::empty({B, Lq, H, D}, q_in.options()).transpose(1, 2);
  if (out.numel() == 0) return out;
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  auto dense = [](const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); };
  std::vector<at::Tensor> k_live, v_live;  // the non-empty segments, last dim dense
  for (size_t i = 0; i < ks.size(); ++i) {
    if (ks[i].size(2) == 0) continue;  // empty segments contribute nothing
    k_live.push_back(dense(ks[i]));
    v_live.push_back(dense(vs[i]));
  }
  if (k_live.empty()) return out.zero_();  // every segment is empty: no keys, the result is defined as zeros
#if HALODIFF_CPU_FUSED_ATTENTION
  if (use_fused_kernel(q_in.scalar_type(), forced)) {
    const at::Tensor q = dense(q_in);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "segmented_attention_cpu", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) fused_attention<scalar_t>(q, k_live, v_live, s, out);
    });
    return out;
  }
#endif
  // The flash kernel computes in the input dtype for float/double; half/bfloat16 go through float32.
  const auto acc_type = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // It ignores the stride of the last dim, so that dim must be dense.
  auto prep = [&](const at::Tensor& t) {
    at::Tensor x = t.scalar_type() == acc_type ? t : t.to(acc_type);
    return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
  };
  const at::Tensor q = prep(q_in);
  std::vector<at::Tensor> outs, lses;
  for (size_t i = 0; i < k_live.size(); ++i) {
    auto [o, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, prep(k_live[i]), prep(v_live[i]), 0.0, false,
                                                                    c10::nullopt, s);
    outs.push_back(std::move(o));
    lses.push_back(std::move(lse));
  }
  if (outs.size() == 1 && outs[0].scalar_type() == q_in.scalar_type() && outs[0].strides() == out.strides()) {
    return outs[0];  // one non-empty segment, already in the output dtype and layout: nothing to merge
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_in.scalar_type(), "segmented_attention_cpu", [&] {
    if (acc_type == at::kDouble) merge_segments<scalar_t, double>(outs, lses, out);
    else merge_segments<scalar_t, float>(outs, lses, out);
  });
  return out;
}

}  // namespace
}  // namespace halodiff

// The schema is declared with every other op in ops.cpp's TORCH_LIBRARY(halodiff, m).
TORCH_LIBRARY_IMPL(halodiff, CPU, m) { m.impl("segmented_attention", &halodiff::segmented_attention_cpu); }

// AVX2+FMA helpers for the CPU kernels. They are compiled for AVX2+FMA whatever the build flags and
// used only when the CPU has both (cpu_has_avx2_fma(), checked at run time); elsewhere (other
// architectures, or HALODIFF_CPU_SIMD == 0) the kernels take their portable paths.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HALODIFF_CPU_SIMD 1
#include <immintrin.h>
#define HALODIFF_AVX2 __attribute__((target("avx2,fma")))

namespace halodiff::simd {

inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// 2^x for x <= 0; x < -125 (including -inf) gives 0, so results are never denormal. Cephes exp2f
// polynomial on the fraction in [-0.5, 0.5]: relative error ~2e-7.
HALODIFF_AVX2 inline __m256 exp2_nonpositive(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-125.f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-125.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// silu(y) = y * sigmoid(y), through t = exp(-|y|) <= 1 so nothing overflows:
// sigmoid(y) = 1 / (1 + t) for y >= 0 and t / (1 + t) for y < 0.
HALODIFF_AVX2 inline __m256 silu(__m256 y) {
  const __m256 neg_abs = _mm256_min_ps(y, _mm256_sub_ps(_mm256_setzero_ps(), y));
  const __m256 t = exp2_nonpositive(_mm256_mul_ps(neg_abs, _mm256_set1_ps(1.4426950408889634f)));
  const __m256 num = _mm256_blendv_ps(_mm256_set1_ps(1.f), t, _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_div_ps(_mm256_mul_ps(y, num), _mm256_add_ps(_mm256_set1_ps(1.f), t));
}

HALODIFF_AVX2 inline float hmax(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}

HALODIFF_AVX2 inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

}  // namespace halodiff::simd
#else
#define HALODIFF_CPU_SIMD 0
#endif

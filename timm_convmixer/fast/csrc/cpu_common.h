// What our CPU kernels share: ATen's vector type for the ISA this file is built for, the activations (ATen's own
// formulas, so results match eager to float32 rounding), and loads/stores of a partial vector at a block's edge
// (float32, or bfloat16 converted to and from float32).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "gelu_table.h"

namespace timm_convmixer_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int VL = Vec::size();  // floats per vector: 8 on AVX2, 16 on AVX-512

// bf16 pairs multiplied by vdpbf16ps (two bf16 products summed into float32 at twice the float32 FMA's rate): compiled
// into AVX-512 builds, in functions of their own (target "avx512bf16"), and run where the CPU has AVX512-BF16.
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define TIMM_CONVMIXER_BF16_DOT 1
#else
#define TIMM_CONVMIXER_BF16_DOT 0
#endif

inline bool bf16_dot_supported() {
#if TIMM_CONVMIXER_BF16_DOT
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// activation codes, as timm_convmixer/fast/cpu_kernels.py passes them
enum Act { IDENTITY = 0, RELU = 1, GELU = 2, GELU_TANH = 3, SILU = 4 };

// GELU's pieces at z: Phi(z), the normal CDF, and exp(-z^2 / 2), the unnormalised density. ATen's erf
// (Abramowitz-Stegun 7.1.26), with ATen's inlined exp_u20 for its out-of-line Sleef exp: 20% faster for the whole
// depthwise kernel, and the same largest error against float64 GELU (4.7e-7 absolute over [-12, 12]).
inline void gelu_parts(Vec z, Vec& cdf, Vec& density) {
  const Vec a = z * Vec(float(M_SQRT1_2));
  const Vec sign = a & Vec(-0.f);
  const Vec ax = a ^ sign;
  const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f), ax, Vec(1.f));
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  density = (ax * ax).neg().exp_u20();
  const Vec erf = (Vec(1.f) - r * t * density) ^ sign;
  cdf = Vec(0.5f) * (Vec(1.f) + erf);
}

// GELU(z) = z * Phi(z). On AVX-512 from a table (gelu_table.h, made and explained by gelu_table.py): q =
// Phi(-|z|) as a cubic on one of 32 intervals, its coefficients picked per lane by a two-register permute, then
// -|z| q for z <= 0 and z - |z| q above; 17 instructions besides the table's loads, 5 of them multiplies or FMAs,
// where gelu_parts takes ~37 with a division. Largest error against float64 over [-12, 12] 2.6e-7 (torch's
// float32 GELU: 4.7e-7). An infinite |z| lands in the last (zero) interval: GELU(+inf) = +inf, GELU(-inf) = 0; a NaN
// stays NaN. Elsewhere gelu_parts.
#if defined(CPU_CAPABILITY_AVX512)
static_assert(GELU_INTERVALS == 32, "two 16-lane registers hold a coefficient's table");

// Where |z| falls in the tables: its interval `i` and position `s` in [0, 1) there, and |z| itself.
struct GeluCell {
  __m512 w, s;
  __m512i i;
};

inline GeluCell gelu_cell(__m512 zv) {
  const __m512 w = _mm512_and_ps(zv, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)));
  const __m512 pos = _mm512_min_ps(_mm512_mul_ps(w, _mm512_set1_ps(GELU_INTERVALS / GELU_W_MAX)),
                                   _mm512_set1_ps(GELU_INTERVALS - 1));  // NaN -> the last interval
  const __m512i i = _mm512_cvttps_epi32(pos);
  return {w, _mm512_sub_ps(pos, _mm512_cvtepi32_ps(i)), i};
}

// A table's polynomial at the cell: each lane's coefficients picked by a two-register permute, Horner in s.
template <int DEGREE>
inline __m512 gelu_poly(const float (*coef)[GELU_INTERVALS], const GeluCell& c) {
  const auto pick = [&](int k) {
    return _mm512_permutex2var_ps(_mm512_load_ps(coef[k]), c.i, _mm512_load_ps(coef[k] + 16));
  };
  __m512 q = _mm512_fmadd_ps(pick(DEGREE), c.s, pick(DEGREE - 1));
  for (int k = DEGREE - 2; k >= 0; --k) q = _mm512_fmadd_ps(q, c.s, pick(k));
  return q;
}

inline __m512 gelu_from_cell(__m512 zv, const GeluCell& c) {
  const __m512 q = gelu_poly<3>(GELU_COEF, c);
  // minus |z| q (plus z above 0), |z| capped where q is zero (so that an infinite z gives 0, not NaN; min keeps a NaN,
  // its 1st operand); one explicit FMA: as a multiply and a subtract, the compiler fused them in some kernels' loops
  // and not in others, and the same GELU came out an ulp apart between kernels and between builds
  const __m512 above = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(zv, _mm512_setzero_ps(), _CMP_GT_OQ), zv);
  return _mm512_fnmadd_ps(_mm512_min_ps(_mm512_set1_ps(GELU_W_MAX), c.w), q, above);
}
#endif

inline Vec gelu(Vec z) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(gelu_from_cell(z, gelu_cell(z)));
#else
  Vec cdf, density;
  gelu_parts(z, cdf, density);
  return z * cdf;
#endif
}

constexpr float GELU_TANH_K = float(M_SQRT2 * M_2_SQRTPI * 0.5);  // sqrt(2 / pi)

template <int ACT>
inline Vec activate(Vec z) {
  if constexpr (ACT == RELU) {
    return at::vec::clamp_min(z, Vec(0.f));
  } else if constexpr (ACT == GELU) {
    return gelu(z);
  } else if constexpr (ACT == GELU_TANH) {
    const Vec inner = Vec(GELU_TANH_K) * (z + Vec(0.044715f) * z * z * z);
    return Vec(0.5f) * z * (Vec(1.f) + inner.tanh());
  } else if constexpr (ACT == SILU) {
    return z / (Vec(1.f) + z.neg().exp());
  } else {
    return z;
  }
}

// The activation at z and its derivative there, sharing their transcendental (for a backward pass that needs both).
template <int ACT>
inline void activate_with_slope(Vec z, Vec& a, Vec& slope) {
  if constexpr (ACT == RELU) {
    const Vec positive = z > Vec(0.f);  // all-ones lanes where z > 0, as ATen's threshold_backward keeps them
    a = at::vec::clamp_min(z, Vec(0.f));
    slope = positive & Vec(1.f);
  } else if constexpr (ACT == GELU) {
#if defined(CPU_CAPABILITY_AVX512)
    // the slope from its own table (gelu_table.py): s(|z|) for z <= 0, 1 - s(|z|) above; 1.0e-7 from float64, as
    // close as the erf-based one below, and a GELU normalisation's backward 1.2x-1.4x as fast (Zen 4, 3 processes)
    const GeluCell c = gelu_cell(z);
    a = Vec(gelu_from_cell(z, c));  // as the forward computed it
    const __m512 p = gelu_poly<4>(GELU_SLOPE_COEF, c);
    const __mmask16 above = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ);
    slope = Vec(_mm512_mask_sub_ps(p, above, _mm512_set1_ps(1.f), p));
#else
    Vec cdf, density;
    gelu_parts(z, cdf, density);
    a = gelu(z);  // as the forward computed it
    slope = at::vec::fmadd(z * Vec(float(0.5 * M_2_SQRTPI * M_SQRT1_2)), density, cdf);  // Phi + z * phi
#endif
  } else if constexpr (ACT == GELU_TANH) {
    const Vec z2 = z * z;
    const Vec th = (Vec(GELU_TANH_K) * (z + Vec(0.044715f) * z2 * z)).tanh();
    const Vec half_1p = Vec(0.5f) * (Vec(1.f) + th);
    a = z * half_1p;
    const Vec d_inner = Vec(GELU_TANH_K) * at::vec::fmadd(Vec(3.f * 0.044715f), z2, Vec(1.f));
    slope = half_1p + Vec(0.5f) * z * (Vec(1.f) - th * th) * d_inner;
  } else if constexpr (ACT == SILU) {
    const Vec sig = Vec(1.f) / (Vec(1.f) + z.neg().exp());
    a = z * sig;
    slope = sig * at::vec::fmadd(z, Vec(1.f) - sig, Vec(1.f));
  } else {
    a = z;
    slope = Vec(1.f);
  }
}

// Calls `f(std::integral_constant<int, ACT>{})` for the activation code `act` (checked by the caller): one
// instantiation of a kernel per activation, so the activation is inlined into its loop.
template <typename F>
inline void with_activation(int64_t act, F&& f) {
  switch (act) {
    case RELU: f(std::integral_constant<int, RELU>{}); break;
    case GELU: f(std::integral_constant<int, GELU>{}); break;
    case GELU_TANH: f(std::integral_constant<int, GELU_TANH>{}); break;
    case SILU: f(std::integral_constant<int, SILU>{}); break;
    default: f(std::integral_constant<int, IDENTITY>{});
  }
}

// Vector `v` of `n` floats at `p` (a pixel's channels in a block, a tile row's in a panel): whole where VL floats
// remain, else the part that does.
inline Vec load_part(const float* p, int64_t v, int64_t n) {
  const int64_t left = n - v * VL;
  return left >= VL ? Vec::loadu(p + v * VL) : Vec::loadu(p + v * VL, left);
}

inline void store_part(const Vec& x, float* p, int64_t v, int64_t n) {
  const int64_t left = n - v * VL;
  if (left >= VL) x.store(p + v * VL); else x.store(p + v * VL, left);
}

// The same for bfloat16 data computed on in float32: widened exactly on load, rounded to nearest even on store
// (ATen's conversion, NaN kept). Whole vectors convert in registers, on AVX-512 (where CPUs with native bf16 are) and
// on AVX2 (where our kernels are the fast way through bf16 autocast: without native bf16, oneDNN emulates it); a
// partial vector at a block's edge, and other ISAs, go through a float array.
inline Vec load_part(const c10::BFloat16* p, int64_t v, int64_t n) {
  const int64_t left = std::min<int64_t>(VL, n - v * VL);
  p += v * VL;
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i h = left >= VL ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                               : _mm256_maskz_loadu_epi16(__mmask16((1u << left) - 1), p);
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#else
#if defined(CPU_CAPABILITY_AVX2)
  if (left >= VL) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#endif
  float tmp[VL] = {};
  for (int64_t i = 0; i < left; ++i) tmp[i] = float(p[i]);
  return Vec::loadu(tmp);
#endif
}

inline void store_part(const Vec& x, c10::BFloat16* p, int64_t v, int64_t n) {
  const int64_t left = std::min<int64_t>(VL, n - v * VL);
  p += v * VL;
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i h = at::vec::cvtfp32_bf16(__m512(x));
  if (left >= VL) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  else _mm256_mask_storeu_epi16(p, __mmask16((1u << left) - 1), h);
#else
#if defined(CPU_CAPABILITY_AVX2)
  if (left >= VL) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(x)));
    return;
  }
#endif
  float tmp[VL];
  x.store(tmp);
  for (int64_t i = 0; i < left; ++i) p[i] = c10::BFloat16(tmp[i]);
#endif
}

}  // namespace timm_convmixer_cpu

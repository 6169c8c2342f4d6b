// The depthwise half of an eval-mode ConvMixer block on a CPU, in one pass over the activations:
//
//     u = x + scale * act(depthwise_conv_same(x, taps) + bias)        (NHWC, float32 or bfloat16)
//
// where x may be given as a per-channel affine of the stored tensor, x = in_scale * a + in_shift: the previous
// block's pointwise BatchNorm, carried here instead of written out by a pass of its own (the affine is applied as
// each input row is copied into the ring, so the zero padding stays zero, as it is for x).
//
// Why a kernel of our own: at ConvMixer's shapes (hundreds of channels, kernels 5-9, 16-32 tokens a side) oneDNN's
// channels_last depthwise convolution ran at 15-30 GFLOP/s on an AVX2 Zen 3, its pointwise neighbour at ~110, so a
// block spent a third of its time in the conv that holds a tenth of its FLOPs, plus a separate pass for BatchNorm and
// the residual. Reading NHWC taps straight from the tensor walks memory at a stride of C floats, which lands every
// row of the window in the same few L1 sets; here each work item copies its input rows, once each, into a small
// zero-padded ring of contiguous rows for one block of channels, so every tap reads L1 and no tap needs a bounds
// check. Each output row is finished (activation, scale, residual from the ring) while it is in L1, and written
// once. Built at first use by timm_convmixer/fast/cpu_kernels.py for the vector ISA ATen dispatches to on this CPU
// (ATen's Vectorized<float>: 8 floats on AVX2, 16 on AVX-512).
//
// x may be bfloat16, and u then bfloat16 or float32: the kernel computes in float32 (x widened as it is copied
// into the ring, a bf16 u rounded once as it is stored). Under bf16 autocast a block's depthwise half so reads (and
// with a bf16 u writes) half the bytes and rounds once, where eager rounds after the conv, the activation, the
// BatchNorm and the add; a float32 u feeds our GEMM, which computes in float32 wherever the CPU has no native bf16.
// Where it has (AVX512-BF16), a bf16 x and u at the strips' kernel sizes take the pair ring instead (conv_strip_pairs):
// taps rounded to bf16, as eager autocast's convolution rounds its weight, two taps to a vdpbf16ps; the sums and the
// epilogue stay float32. On a Zen 4 that ran 1.10x-1.39x the float32-computing kernel on bf16 data at six
// variants' shapes (GELU, batch 8 at 224 px or 64 at 32 px).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace timm_convmixer_cpu;

constexpr int CB = 16;        // channels per block: one 64-byte cache line of each pixel
constexpr int NV = CB / VL;   // vectors per block: 2 on AVX2, 1 on AVX-512
// What AVX-512 builds (one vector per channel block) do differently, measured on an AVX-512 Xeon: rows computed by
// conv_strip for the ConvMixer kernel sizes, 16 outputs at a time. AVX2 builds keep the schedule measured on a Zen 3
// until one is measured there.
constexpr bool AVX512_SCHEDULE = NV == 1;
constexpr int TW = AVX512_SCHEDULE ? 16 : 8 / NV;  // output pixels of a row computed together: 8-16 accumulators
static_assert(CB % VL == 0 && NV >= 1 && TW >= 1, "a channel block must be whole vectors");
constexpr int64_t RING_BYTES = 16 * 1024;  // a ring this size, the taps and one row leave room in a 32 KiB L1
// Where the next row's lines are asked for (__builtin_prefetch's locality): into L1 on AVX2 builds (measured on a
// Zen 3), into L2 on AVX-512 builds. A row's pixels lie C values apart, 0.5-3 KiB at ConvMixer's widths, so its
// lines fall in a few of L1's sets, which the ring already fills half deep: fetched into L1, the next row's input
// and output lines evicted each other (and the current row's) before use; the input's masked load was most of the
// bf16 kernel's input copy in a profile. Into L2, against L1, same process (Zen 4, 15 rounds, the eight variants'
// shapes, bit-identical): bf16 pairs 1.07x-1.26x at 32 x 32 pixels, 1.00x at 16 x 16 with k9, 0.86x and 1.08x in two
// runs at 64 x 256 x 16 x 16 k5; float32 1.02x-1.21x. Whole models in bf16 1.01x-1.05x (four variants).
constexpr int AHEAD_LOCALITY = AVX512_SCHEDULE ? 2 : 3;

template <typename TI, typename TO>
struct Problem {
  const TI* x;        // N, H, W, C
  const float* taps;  // k * k, C
  const float* bias;  // C
  const float* scale; // C
  const float* in_scale;  // C, or null: x is the stored tensor itself
  const float* in_shift;  // C (with in_scale)
  TO* out;            // N, H, W, C
  int64_t N, H, W, C, k, pad;  // pad: zero rows (and columns) before the image; k - 1 - pad after
  bool residual;      // out = x + ...; false (float32 only): out = scale * act(conv + bias), the bare conv
  const float* addend;  // N, H, W, C, or null: the bare conv plus this (a transposed conv's gradient plus the
                        // gradient that passed the conv, without a pass of its own)
};

// One work item: image n, the channel block from c0, output rows [r0, r1), output columns [w0, w1).
struct Item {
  int64_t n, c0, r0, r1, w0, w1;
};

// TW (or 1) outputs of one row: conv + bias into `z` (row-local, CB floats per column). `ring[kh]` points at input
// row oh - pad + kh, already offset to the first output's window; every tap is in the ring (zeros outside the image).
template <int T>
inline void conv_tile(const float* const* ring, const float* taps, const float* bias, int64_t kh_lo, int64_t kh_hi,
                      int64_t k, float* z) {
  Vec acc[T][NV];
  for (int v = 0; v < NV; ++v) {
    const Vec b = Vec::loadu(bias + v * VL);
    for (int t = 0; t < T; ++t) acc[t][v] = b;
  }
  for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
    const float* row = ring[kh];
    const float* tap = taps + kh * k * CB;
    for (int64_t kw = 0; kw < k; ++kw) {
      Vec w[NV];
      for (int v = 0; v < NV; ++v) w[v] = Vec::loadu(tap + kw * CB + v * VL);
      for (int t = 0; t < T; ++t)
        for (int v = 0; v < NV; ++v)
          acc[t][v] = at::vec::fmadd(Vec::loadu(row + (kw + t) * CB + v * VL), w[v], acc[t][v]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < NV; ++v) acc[t][v].store(z + t * CB + v * VL);
}

// T outputs of one row, as conv_tile<T>, for a kernel size K known at compile time and one vector per channel
// block: each input column of a window row is loaded once and feeds every output it touches, the row's K taps held
// in registers, so a window row costs T + K - 1 input loads for T * K FMAs where conv_tile loads an input per FMA.
// Each accumulator adds its taps in conv_tile's order: both give the same floats.
template <int K, int T>
inline void conv_strip(const float* const* ring, const float* taps, const float* bias, int64_t kh_lo,
                       int64_t kh_hi, float* z) {
  static_assert(K > 0 && NV == 1, "conv_strip: a kernel size, and a channel block in one vector");
  Vec acc[T];
  const Vec b = Vec::loadu(bias);
#pragma GCC unroll 32
  for (int t = 0; t < T; ++t) acc[t] = b;
  for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
    const float* row = ring[kh];
    Vec w[K];
#pragma GCC unroll 16
    for (int kw = 0; kw < K; ++kw) w[kw] = Vec::loadu(taps + (kh * K + kw) * CB);
#pragma GCC unroll 64
    for (int q = 0; q < T + K - 1; ++q) {
      const Vec in = Vec::loadu(row + q * CB);
#pragma GCC unroll 16
      for (int kw = 0; kw < K; ++kw) {
        const int t = q - kw;
        if (t >= 0 && t < T) acc[t] = at::vec::fmadd(in, w[kw], acc[t]);
      }
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < T; ++t) acc[t].store(z + t * CB);
}

// One output row's conv + bias into `z`: conv_strip where the kernel size K has one (K = 0: none), else conv_tile.
// `rows[kh]` points at the ring row of window row kh, at the row's first output.
template <int K>
inline void conv_row(const float* const* rows, const float* taps, const float* bias, int64_t kh_lo, int64_t kh_hi,
                     int64_t k, int64_t width, float* z) {
  const float* ring[64];
  for (int64_t j = 0; j < width;) {
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) ring[kh] = rows[kh] + j * CB;
    if constexpr (K > 0) {
      if (width - j >= 16) { conv_strip<K, 16>(ring, taps, bias, kh_lo, kh_hi, z + j * CB); j += 16; continue; }
      if (width - j >= 8) { conv_strip<K, 8>(ring, taps, bias, kh_lo, kh_hi, z + j * CB); j += 8; continue; }
    }
    if (width - j >= TW) { conv_tile<TW>(ring, taps, bias, kh_lo, kh_hi, k, z + j * CB); j += TW; }
    else { conv_tile<1>(ring, taps, bias, kh_lo, kh_hi, k, z + j * CB); j += 1; }
  }
}

#if TIMM_CONVMIXER_BF16_DOT
// The bf16 pair ring: word (j, c) holds channel c of ring columns j and j + 1 as two bf16 (j's low), and a pair of
// taps (kw = 2p, 2p + 1; the last of an odd kernel with a zero) multiplies it in one vdpbf16ps, which sums both
// products into the float32 sum: output t of a row takes pairs t + 2p, so a window row costs ceil(K / 2)
// instructions per output where conv_strip takes K FMAs. Otherwise conv_strip's schedule: each pair loaded once
// feeds every output it reaches, the row's taps held in registers.
template <int K, int T>
__attribute__((target("avx512bf16"))) inline void conv_strip_pairs(const uint32_t* const* ring,
                                                                   const uint32_t* taps, const float* bias,
                                                                   int64_t kh_lo, int64_t kh_hi, float* z) {
  constexpr int KP = (K + 1) / 2;
  __m512 acc[T];
  const __m512 b = _mm512_loadu_ps(bias);
#pragma GCC unroll 32
  for (int t = 0; t < T; ++t) acc[t] = b;
  for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
    const uint32_t* row = ring[kh];
    __m512bh w[KP];
#pragma GCC unroll 8
    for (int p = 0; p < KP; ++p) w[p] = (__m512bh)_mm512_loadu_si512(taps + (kh * KP + p) * CB);
#pragma GCC unroll 64
    for (int q = 0; q < T + 2 * (KP - 1); ++q) {
      const __m512bh in = (__m512bh)_mm512_loadu_si512(row + q * CB);
#pragma GCC unroll 8
      for (int p = 0; p < KP; ++p) {
        const int t = q - 2 * p;
        if (t >= 0 && t < T) acc[t] = _mm512_dpbf16_ps(acc[t], in, w[p]);
      }
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(z + t * CB, acc[t]);
}

// One output row from the pair ring, as conv_row: strips of 16 and 8 outputs, then one at a time.
template <int K>
__attribute__((noinline, target("avx512bf16"))) void conv_row_pairs(const uint32_t* const* rows,
                                                                    const uint32_t* taps, const float* bias,
                                                                    int64_t kh_lo, int64_t kh_hi, int64_t width,
                                                                    float* z) {
  const uint32_t* ring[64];
  for (int64_t j = 0; j < width;) {
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) ring[kh] = rows[kh] + j * CB;
    if (width - j >= 16) { conv_strip_pairs<K, 16>(ring, taps, bias, kh_lo, kh_hi, z + j * CB); j += 16; }
    else if (width - j >= 8) { conv_strip_pairs<K, 8>(ring, taps, bias, kh_lo, kh_hi, z + j * CB); j += 8; }
    else { conv_strip_pairs<K, 1>(ring, taps, bias, kh_lo, kh_hi, z + j * CB); j += 1; }
  }
}

// The epilogue of one output row from the pair ring (run_item's, for PAIRS): the residual is a pair's low bf16, and
// the output is rounded by vcvtneps2bf16, one instruction where ATen's rounding takes eight (it flushes float32
// denormals, below 1.2e-38, to zero, as vdpbf16ps does).
template <int ACT>
__attribute__((noinline, target("avx512bf16"))) void finish_row_pairs(const float* z, const uint32_t* center,
                                                                       const float* scale, int64_t cols,
                                                                       int64_t width, c10::BFloat16* out, int64_t C,
                                                                       bool ahead, int64_t W) {
  const __mmask16 mask = __mmask16((1u << cols) - 1);
  const Vec s = Vec::loadu(scale, cols);
  for (int64_t j = 0; j < width; ++j) {
    if (ahead) __builtin_prefetch(out + (W + j) * C, 0, AHEAD_LOCALITY);
    const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(center + j * CB), 16));
    const __m512 r = at::vec::fmadd(activate<ACT>(Vec::loadu(z + j * CB)), s, Vec(x));
    _mm256_mask_storeu_epi16(out + j * C, mask, (__m256i)_mm512_cvtneps_pbh(r));
  }
}

// Input row `src` (`count` pixels C bf16 apart, `cols` channels each; with `in_scale`, the affine applied in float32
// and rounded to bf16) into the pair ring's slot `pairs` from ring column `first`, through `line` (a bf16 copy of
// the row's ring_w + 1 columns, zero outside the image): pair column j is then one 64-byte load of columns j and
// j + 1 and one permute interleaving them.
__attribute__((noinline, target("avx512bf16"))) void pair_row(const c10::BFloat16* src, int64_t C, int64_t count,
                                                               int64_t cols, const float* in_scale,
                                                               const float* in_shift, int64_t first, int64_t ring_w,
                                                               bool ahead, int64_t W, uint16_t* line,
                                                               uint32_t* pairs) {
  const __mmask16 mask = __mmask16((1u << cols) - 1);
  for (int64_t iw = 0; iw < count; ++iw) {
    if (ahead) __builtin_prefetch(src + (W + iw) * C, 0, AHEAD_LOCALITY);
    __m256i h = _mm256_maskz_loadu_epi16(mask, src + iw * C);
    if (in_scale != nullptr) {
      const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      h = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(a, _mm512_loadu_ps(in_scale), _mm512_loadu_ps(in_shift)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(line + (first + iw) * CB), h);
  }
  alignas(64) static constexpr uint16_t INTERLEAVE[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(INTERLEAVE);
  for (int64_t j = 0; j < ring_w; ++j)
    _mm512_storeu_si512(pairs + j * CB, _mm512_permutexvar_epi16(order, _mm512_loadu_si512(line + j * CB)));
}
#endif

// One channel block's operands in `ops` (operand_floats(k) floats, written by block_operands, read by run_item):
// taps, bias and the input's affine, one layout for both.
template <typename F>
struct Operands {
  F *taps, *bias, *in_scale, *in_shift;
  Operands(F* ops, int64_t k) : taps(ops), bias(ops + k * k * CB), in_scale(bias + CB), in_shift(in_scale + CB) {}
};
inline int64_t operand_floats(int64_t k) { return (k * k + 3) * CB; }

// The per-channel operands of channel block c0 as its items read them, zero beyond the block's channels: taps (k*k x
// CB; PAIRS: k x ceil(k / 2) x CB pairs), bias, and the input's affine (identity when the input is x itself). Done
// once per block and call (run), not per item: the bf16 pair taps are k * ceil(k / 2) * 16 roundings, and repacked
// by every item the pair kernel ran 1.08x-1.18x slower at six variants' shapes (most at k9, 16 x 16 pixels, where
// an item is smallest; the float32 kernel 0.98x-1.06x, Zen 4, same process).
template <bool PAIRS, typename TI, typename TO>
void block_operands(const Problem<TI, TO>& p, int64_t c0, float* ops) {
  const int64_t C = p.C, k = p.k;
  const int64_t cols = std::min<int64_t>(CB, C - c0);
  const Operands<float> o(ops, k);
  float *taps = o.taps, *bias = o.bias, *in_scale = o.in_scale, *in_shift = o.in_shift;
  // a tap at a time, its channels one contiguous read. Channel by channel, the k * k reads lay C floats apart: at
  // ConvMixer's widths (768-1536) in one to four of L1's sets, fewer lines than taps, so every read missed L1. Tap
  // by tap, the kernel ran 1.02x-1.14x faster (AVX2 Zen 3, eight shapes, two runs; bitwise the same output)
  const auto tap = [&](int64_t t, int64_t c) { return c < cols ? p.taps[t * C + c0 + c] : 0.f; };
  if constexpr (PAIRS) {
    const int64_t kp = (k + 1) / 2;
    uint32_t* words = reinterpret_cast<uint32_t*>(taps);
    for (int64_t kh = 0; kh < k; ++kh)
      for (int64_t q = 0; q < kp; ++q)
        for (int64_t c = 0; c < CB; ++c) {
          const c10::BFloat16 lo(tap(kh * k + 2 * q, c)), hi(2 * q + 1 < k ? tap(kh * k + 2 * q + 1, c) : 0.f);
          words[(kh * kp + q) * CB + c] = uint32_t(lo.x) | uint32_t(hi.x) << 16;
        }
  } else {
    for (int64_t t = 0; t < k * k; ++t)
      for (int64_t c = 0; c < CB; ++c) taps[t * CB + c] = tap(t, c);
  }
  for (int64_t c = 0; c < CB; ++c) {
    bias[c] = c < cols ? p.bias[c0 + c] : 0.f;
    in_scale[c] = p.in_scale && c < cols ? p.in_scale[c0 + c] : 1.f;
    in_shift[c] = p.in_scale && c < cols ? p.in_shift[c0 + c] : 0.f;
  }
}

// One item, with its block's operands (block_operands) and `scratch` for its ring.
// PAIRS: a bf16 x and out with AVX512-BF16 (K one of the strips'), taps rounded to bf16 and multiplied in pairs
// (conv_row_pairs) as eager bf16 autocast's convolution multiplies bf16 operands; the sums, bias, activation,
// BatchNorm and residual in float32 as otherwise, the output rounded once.
template <int ACT, int K, bool PAIRS, typename TI, typename TO>
void run_item(const Problem<TI, TO>& p, const Item& it, const float* ops, float* scratch) {
  const int64_t H = p.H, W = p.W, C = p.C, k = p.k, pad = p.pad;
  const int64_t cols = std::min<int64_t>(CB, C - it.c0);  // channels of this block (the last may be partial)
  const int64_t width = it.w1 - it.w0, ring_w = width + k - 1;
  const Operands<const float> o(ops, k);
  const float *taps = o.taps, *bias = o.bias, *in_scale = o.in_scale, *in_shift = o.in_shift;
  float* rows = scratch;                // k ring slots x ring_w x CB (PAIRS: pairs of columns j, j + 1)
  float* z = rows + k * ring_w * CB;    // width x CB: one output row before its epilogue
  // the zeros outside the image: in the ring itself, or (PAIRS, whose ring slots are rewritten whole as each row is
  // paired) in the bf16 copy of an input row (ring columns 0..ring_w, one past the last pair's)
  c10::BFloat16* line = reinterpret_cast<c10::BFloat16*>(z + width * CB);
  if constexpr (PAIRS) std::fill(line, line + (ring_w + 1) * CB, c10::BFloat16(0.f));
  else std::fill(rows, rows + k * ring_w * CB, 0.f);
  // ring column j holds input column w0 - pad + j; columns outside the image stay zero for the whole item. A
  // pixel lies C floats from the next, too far apart for the hardware prefetchers, so the next row's lines are
  // asked for while this one is copied
  const int64_t in_lo = std::max<int64_t>(0, it.w0 - pad), in_hi = std::min<int64_t>(W, it.w1 - pad + k - 1);
  const int64_t first = in_lo - (it.w0 - pad);  // the ring column of input column in_lo
  auto load_row = [&](int64_t ih) {
    float* dst = rows + (ih % k) * ring_w * CB;
    const TI* src = p.x + ((it.n * H + ih) * W + in_lo) * C + it.c0;
    const bool ahead = ih + 1 < H;
#if TIMM_CONVMIXER_BF16_DOT
    if constexpr (PAIRS) {
      pair_row(src, C, in_hi - in_lo, cols, p.in_scale ? in_scale : nullptr, in_shift, first, ring_w, ahead, W,
               reinterpret_cast<uint16_t*>(line), reinterpret_cast<uint32_t*>(dst));
      return;
    }
#endif
    for (int64_t iw = 0; iw < in_hi - in_lo; ++iw) {
      if (ahead) __builtin_prefetch(src + (W + iw) * C, 0, AHEAD_LOCALITY);
      for (int64_t v = 0; v * VL < cols; ++v) {
        const Vec a = load_part(src + iw * C, v, cols);
        (p.in_scale ? at::vec::fmadd(a, Vec::loadu(in_scale + v * VL), Vec::loadu(in_shift + v * VL)) : a)
            .store(dst + (first + iw) * CB + v * VL);
      }
    }
  };
  int64_t next = std::max<int64_t>(0, it.r0 - pad);  // the next input row the ring needs
  const float* ring[64];
  for (int64_t oh = it.r0; oh < it.r1; ++oh) {
    for (; next < std::min<int64_t>(H, oh - pad + k); ++next) load_row(next);
    const int64_t kh_lo = std::max<int64_t>(0, pad - oh), kh_hi = std::min<int64_t>(k, H + pad - oh);
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) ring[kh] = rows + ((oh - pad + kh) % k) * ring_w * CB;
#if TIMM_CONVMIXER_BF16_DOT
    if constexpr (PAIRS)
      conv_row_pairs<K>(reinterpret_cast<const uint32_t* const*>(ring), reinterpret_cast<const uint32_t*>(taps),
                        bias, kh_lo, kh_hi, width, z);
    else
#endif
      conv_row<K>(ring, taps, bias, kh_lo, kh_hi, k, width, z);
    // epilogue while the row is in L1: u = x + scale * act(z), x read from the ring (input row oh, ring column
    // pad + j; PAIRS: a pair's low bf16), not again from memory. The stores land C floats apart, each on a line not
    // yet in cache: asking for the next row's lines while this one is stored took the k = 1 kernel from 4.4 to 2.4 ms
    // at 64x256x16x16 on an AVX-512 Xeon, and whole blocks (with pw_block's output lines asked for likewise)
    // 1.02x-1.09x faster on an AVX2 Zen 3 (eight shapes, three runs). A read prefetch: PREFETCHW (-mprfchw) ran
    // 0.81x-0.99x of it there, fetching two rows ahead or into L2 0.91x-1.11x (into L2 on AVX-512: AHEAD_LOCALITY)
    const float* center = rows + (oh % k) * ring_w * CB + pad * CB;
    TO* out = p.out + ((it.n * H + oh) * W + it.w0) * C + it.c0;
    const bool out_ahead = oh + 1 < it.r1;
#if TIMM_CONVMIXER_BF16_DOT
    if constexpr (PAIRS) {
      finish_row_pairs<ACT>(z, reinterpret_cast<const uint32_t*>(center), p.scale + it.c0, cols, width, out, C,
                            out_ahead, W);
      continue;
    }
#endif
    // (the residual's test outside the loops: inside them it changed the float32 path's rounding in 2% of outputs)
    enum { BARE, RESIDUAL, ADDEND };
    const float* addend = p.addend ? p.addend + ((it.n * H + oh) * W + it.w0) * C + it.c0 : nullptr;
    const auto finish = [&](auto mode) {
      constexpr int MODE = decltype(mode)::value;
      for (int64_t j = 0; j < width; ++j) {
        if (out_ahead) __builtin_prefetch(out + (W + j) * C, 0, AHEAD_LOCALITY);
        if constexpr (MODE == ADDEND)
          if (out_ahead) __builtin_prefetch(addend + (W + j) * C, 0, AHEAD_LOCALITY);
        for (int64_t v = 0; v * VL < cols; ++v) {
          const Vec a = activate<ACT>(Vec::loadu(z + j * CB + v * VL)), s = load_part(p.scale + it.c0, v, cols);
          if constexpr (MODE == RESIDUAL)
            store_part(at::vec::fmadd(a, s, Vec::loadu(center + j * CB + v * VL)), out + j * C, v, cols);
          else if constexpr (MODE == ADDEND)
            store_part(at::vec::fmadd(a, s, load_part(addend + j * C, v, cols)), out + j * C, v, cols);
          else
            store_part(a * s, out + j * C, v, cols);
        }
      }
    };
    if (p.residual) finish(std::integral_constant<int, RESIDUAL>{});
    else if (addend) finish(std::integral_constant<int, ADDEND>{});
    else finish(std::integral_constant<int, BARE>{});
  }
}

template <int ACT, int K, bool PAIRS, typename TI, typename TO>
void run(const Problem<TI, TO>& p) {
  // columns per item: as many as keep the ring within RING_BYTES (a multiple of TW), at least TW
  const int64_t ring_cols = RING_BYTES / (p.k * CB * int64_t(sizeof(float)));
  const int64_t seg = std::min<int64_t>(p.W, std::max<int64_t>(TW, (ring_cols - (p.k - 1)) / TW * TW));
  const int64_t segs = (p.W + seg - 1) / seg, blocks = (p.C + CB - 1) / CB;
  // enough items for the threads: split the rows into bands when images x channel blocks x segments are few
  // (each band re-reads k - 1 rows of halo)
  const int64_t per_band = p.N * blocks * segs, want = 4 * int64_t(at::get_num_threads());
  const int64_t bands = std::min<int64_t>(p.H, std::max<int64_t>(1, (want + per_band - 1) / per_band));
  const int64_t band = (p.H + bands - 1) / bands;
  const int64_t op_floats = operand_floats(p.k);
  std::vector<float> ops(blocks * op_floats);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block_operands<PAIRS>(p, b * CB, ops.data() + b * op_floats);
  });
  // the ring, one output row, and (PAIRS) an input row in bf16
  const int64_t scratch_floats = (p.k * (seg + p.k - 1) + seg + (seg + p.k + 1) / 2 + 1) * CB;
  at::parallel_for(0, per_band * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t i = begin; i < end; ++i) {
      Item it;
      it.n = i / (blocks * segs * bands);
      it.c0 = (i / (segs * bands)) % blocks * CB;
      it.w0 = (i / bands) % segs * seg;
      it.w1 = std::min(p.W, it.w0 + seg);
      it.r0 = i % bands * band;
      it.r1 = std::min(p.H, it.r0 + band);
      if (it.r0 < it.r1) run_item<ACT, K, PAIRS, TI, TO>(p, it, ops.data() + it.c0 / CB * op_floats, scratch.data());
    }
  });
}

void dw_block(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& bias, const at::Tensor& scale, int64_t k,
              int64_t act, const at::Tensor& out, const c10::optional<at::Tensor>& in_scale,
              const c10::optional<at::Tensor>& in_shift, bool residual, int64_t pad,
              const c10::optional<at::Tensor>& addend) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
              x.dim() == 4, "dw_block: x must be a 4-d float32 or bfloat16 CPU tensor, got ", x.scalar_type(),
              " with ", x.dim(), " dims");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "dw_block: x must be channels_last");
  const int64_t C = x.size(1);
  TORCH_CHECK(k >= 1 && k <= 64, "dw_block: kernel size must be 1..64, got ", k);
  for (const at::Tensor* t : {&taps, &bias, &scale})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "dw_block: taps, bias and scale must be contiguous float32 CPU tensors");
  TORCH_CHECK(taps.numel() == k * k * C && bias.numel() == C && scale.numel() == C,
              "dw_block: expected taps of ", k * k, " x ", C, " and ", C, " bias and scale values");
  TORCH_CHECK(in_scale.has_value() == in_shift.has_value(), "dw_block: give both in_scale and in_shift, or neither");
  if (in_scale.has_value())
    for (const at::Tensor* t : {&*in_scale, &*in_shift})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == C,
                  "dw_block: in_scale and in_shift must be contiguous float32 CPU tensors of ", C, " values");
  TORCH_CHECK(act >= IDENTITY && act <= SILU, "dw_block: unknown activation code ", act);
  TORCH_CHECK(out.device().is_cpu() && (out.scalar_type() == x.scalar_type() || out.scalar_type() == at::kFloat) &&
              out.sizes() == x.sizes() && out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dw_block: out must be a channels_last CPU tensor of x's shape, in x's dtype or float32");
  TORCH_CHECK(!out.is_same(x), "dw_block: out must not be x (each output reads its neighbours' inputs)");
  TORCH_CHECK(residual || x.scalar_type() == at::kFloat, "dw_block: residual=False takes a float32 x");
  // pad: zero rows and columns before the image, the rest of the window's k - 1 after; "same" unless given
  if (pad < 0) pad = (k - 1) / 2;
  TORCH_CHECK(pad < k, "dw_block: pad must be below the kernel size ", k, ", got ", pad);
  TORCH_CHECK(!residual || pad == (k - 1) / 2, "dw_block: a padding other than \"same\" takes residual=False");
  if (addend.has_value())
    TORCH_CHECK(!residual && addend->device().is_cpu() && addend->scalar_type() == at::kFloat &&
                    addend->sizes() == x.sizes() && addend->is_contiguous(at::MemoryFormat::ChannelsLast),
                "dw_block: an addend takes residual=False and must be a channels_last float32 CPU tensor of x's shape");
  if (out.numel() == 0) return;
  auto launch = [&](auto in_zero, auto out_zero) {
    using TI = decltype(in_zero);
    using TO = decltype(out_zero);
    const Problem<TI, TO> p{x.data_ptr<TI>(), taps.data_ptr<float>(), bias.data_ptr<float>(), scale.data_ptr<float>(),
                            in_scale.has_value() ? in_scale->data_ptr<float>() : nullptr,
                            in_shift.has_value() ? in_shift->data_ptr<float>() : nullptr, out.data_ptr<TO>(),
                            x.size(0), x.size(2), x.size(3), C, k, pad, residual,
                            addend.has_value() ? addend->data_ptr<float>() : nullptr};
    // bf16 in and out where the CPU multiplies bf16 pairs: the strips' kernel sizes on pairs (see run_item)
    constexpr bool BF16 = std::is_same_v<TI, c10::BFloat16> && std::is_same_v<TO, c10::BFloat16>;
    const bool pairs = BF16 && bf16_dot_supported();
    with_activation(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      if constexpr (AVX512_SCHEDULE) {
        const auto strip = [&](auto size) {
          constexpr int K = decltype(size)::value;
          if constexpr (BF16 && TIMM_CONVMIXER_BF16_DOT)
            if (pairs) return run<A, K, true>(p);
          run<A, K, false>(p);
        };
        switch (k) {  // ConvMixer's kernel sizes get a strip compiled for them
          case 5: return strip(std::integral_constant<int, 5>{});
          case 7: return strip(std::integral_constant<int, 7>{});
          case 8: return strip(std::integral_constant<int, 8>{});
          case 9: return strip(std::integral_constant<int, 9>{});
        }
      }
      run<A, 0, false>(p);
    });
  };
  if (x.scalar_type() == at::kFloat) launch(float(), float());
  else if (out.scalar_type() == at::kFloat) launch(c10::BFloat16(), float());
  else launch(c10::BFloat16(), c10::BFloat16());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(timm_convmixer_cpu, m) {
  m.def("dw_block(Tensor x, Tensor taps, Tensor bias, Tensor scale, int k, int act, Tensor(a!) out, "
        "Tensor? in_scale=None, Tensor? in_shift=None, bool residual=True, int pad=-1, Tensor? addend=None) -> ()");
}

TORCH_LIBRARY_IMPL(timm_convmixer_cpu, CPU, m) { m.impl("dw_block", &dw_block); }

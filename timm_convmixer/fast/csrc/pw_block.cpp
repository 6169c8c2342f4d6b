// The pointwise half of an eval-mode ConvMixer block on a CPU, as one GEMM with its epilogue:
//
//     y = scale * act(u @ W^T + bias) + shift        (u: NHWC rows of C_in floats, y: NHWC, float32 or bfloat16)
//
// Why a GEMM of our own: the 1x1 convolution holds 76-95% of a ConvMixer's FLOPs. oneDNN's channels_last 1x1
// convolution (with the activation fused) ran at ~110 GFLOP/s on an AVX2 Zen 3 and needs one more pass for the
// BatchNorm affine; onnxruntime's MLAS reached ~135. Here the bias, activation and affine are applied to each
// output tile as its sums are finished, and the tile is written once.
//
// Blocking, BLIS-style with the shapes ConvMixer has (M = pixels in the thousands, K = N = C_in = C_out in the
// hundreds): the weight is packed once (pw_pack) into panels of NR output channels, K x NR contiguous floats. A work
// item is a chunk of up to MC rows of u and a block of NC output channels. Its rows are packed (once per chunk a
// thread meets) into MR-row tiles, K x MR contiguous floats, so the micro-kernel reads each operand as one stream.
// Where K is wide (over WHOLE_K) it is taken in slices of KC: a slice of one panel (KC x NR, 16 KiB) stays in L1
// while every tile of the chunk passes over it, where a whole 1536 x 16 panel (96 KiB) came from L2 for each tile;
// the sums wait in a small per-thread buffer (MC x NC) until the last slice, when bias, activation and BatchNorm
// affine are applied and each output is written once. Against the whole-K kernel with unpacked rows this replaced
// (same process, 21 interleaved rounds, AVX2 Zen 3 VM whose noise is about +-5%): 1.01x-1.15x at K = 1536, 1.04x at
// 512 and 1024, 0.96x at 768.
// A bfloat16 u (bf16 autocast on a CPU with AVX512-BF16) is multiplied in pairs by `vdpbf16ps`, which sums two
// bf16 products into float32 at twice the float32 FMA's rate (235 against 118 GFLOP/s a thread on a Zen 4): what
// eager autocast computes (bf16 operands, float32 sums), with the epilogue fused and its bf16 output rounded by
// vcvtneps2bf16. On that Zen 4 it ran 1.01x-1.13x oneDNN's bf16 1x1 convolution with its BatchNorm pass at seven
// variants' shapes and 1.50x at K = 256 with 65536 rows, where oneDNN falls off (352 against 234 GFLOP/s;
// benchmarks/cpu_pointwise.py, with the GELU table). The weight is then packed as
// pairs along K (pw_pack of a bf16 weight), and u's rows hold theirs as they lie: both GEMMs take K in steps of one
// 32-bit word (a float, or two bf16), so the blocking below is the same in bytes.
// A bfloat16 y is the float32 result rounded once as it is stored: under bf16 autocast on a CPU without native
// bf16 (where oneDNN emulates bf16 15-20x slower than float32) the block computes in float32 and hands on a bf16
// output, as eager autocast's block would, without a pass of its own for the rounding.
// Built by timm_convmixer/fast/cpu_kernels.py with dw_block.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_common.h"

namespace {

using namespace timm_convmixer_cpu;

constexpr int MR = 6;          // rows (pixels) per micro-kernel tile
constexpr int NR = 2 * VL;     // output channels per panel: 16 on AVX2, 32 on AVX-512
constexpr int64_t MC = 96;     // rows per chunk at most (fewer when the threads need more items)
// K below is counted in steps of one 32-bit word per row and output channel: a float32, or a pair of bf16
constexpr int64_t KC = 4096 / NR;  // steps per slice: a panel's slice (KC x NR words) is 16 KiB, 256 x 16 on AVX2
constexpr int64_t WHOLE_K = 1024;  // up to this many steps, one slice (see run)
constexpr int64_t NC = 8 * NR; // output channels per work item
// Two prefetches, measured on an AVX2 Zen 3 only (AVX-512 builds do without them until measured there):
// - Output rows lie N floats apart, each line of a tile's NR outputs one the epilogue would wait for: asked for while
//   the tile's last sums are computed, whole eval blocks ran 1.02x-1.09x faster (with dw_block's output lines asked
//   for likewise; eight shapes, three runs).
// - Where K is taken in slices, each panel slice comes from L3 or memory when its first tile reaches it (at K = 1536
//   the weight is 9 MiB) and that tile waited for it: the next slice, asked for a few lines per tile while this one
//   is in use, made the GEMM 1.05x-1.11x faster at K = 1536 (M = 2048 and 8192, six runs). Asking for the next
//   whole-K panel (K <= 1024, 16-64 KiB) gained nothing reliable (0.97x-1.06x at K = 256-1024), so those go without.
constexpr bool PREFETCH_OUTPUT = VL == 8;
constexpr bool PREFETCH_PANELS = VL == 8;

// MR x NR outputs over K values into `tile` (row stride NR), adding to what `tile` holds if `accumulate`. `a` is
// a packed tile (K x MR), `panel` a panel's slice (K x NR). Twelve named accumulators, not an array: GCC kept an
// array of Vectorized in memory and stored all of it on every k (half the speed, measured).
__attribute__((noinline)) void micro_kernel(const float* __restrict a, const float* __restrict panel, int64_t K,
                                            float* __restrict tile, bool accumulate) {
  Vec c00(0.f), c01(0.f), c10(0.f), c11(0.f), c20(0.f), c21(0.f), c30(0.f), c31(0.f), c40(0.f), c41(0.f),
      c50(0.f), c51(0.f);
  if (accumulate) {
    c00 = Vec::loadu(tile), c01 = Vec::loadu(tile + VL), c10 = Vec::loadu(tile + NR);
    c11 = Vec::loadu(tile + NR + VL), c20 = Vec::loadu(tile + 2 * NR), c21 = Vec::loadu(tile + 2 * NR + VL);
    c30 = Vec::loadu(tile + 3 * NR), c31 = Vec::loadu(tile + 3 * NR + VL), c40 = Vec::loadu(tile + 4 * NR);
    c41 = Vec::loadu(tile + 4 * NR + VL), c50 = Vec::loadu(tile + 5 * NR), c51 = Vec::loadu(tile + 5 * NR + VL);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = Vec::loadu(panel + k * NR), b1 = Vec::loadu(panel + k * NR + VL);
    const float* ak = a + k * MR;
    Vec x(ak[0]);
    c00 = at::vec::fmadd(x, b0, c00);
    c01 = at::vec::fmadd(x, b1, c01);
    x = Vec(ak[1]);
    c10 = at::vec::fmadd(x, b0, c10);
    c11 = at::vec::fmadd(x, b1, c11);
    x = Vec(ak[2]);
    c20 = at::vec::fmadd(x, b0, c20);
    c21 = at::vec::fmadd(x, b1, c21);
    x = Vec(ak[3]);
    c30 = at::vec::fmadd(x, b0, c30);
    c31 = at::vec::fmadd(x, b1, c31);
    x = Vec(ak[4]);
    c40 = at::vec::fmadd(x, b0, c40);
    c41 = at::vec::fmadd(x, b1, c41);
    x = Vec(ak[5]);
    c50 = at::vec::fmadd(x, b0, c50);
    c51 = at::vec::fmadd(x, b1, c51);
  }
  const Vec acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) acc[r][v].store(tile + r * NR + v * VL);
}

#if TIMM_CONVMIXER_BF16_DOT
// The same tile from bf16 pairs: `a` the first of `rows` rows of u, `lda` words apart (a word: a row's two bf16 at
// k; rows past `rows` repeat the last, computed and never written), `panel` a slice of bf16 pair panels (K x NR
// words, each an output channel's two weights at k); each vdpbf16ps adds both products of its pair to the float32
// sums, so a step is a pair of K. The rows are read where they lie, not packed first: at K = 256 packing took 7% of
// the GEMM, and reading six rows in place 2% (1% at K = 512-1536; Zen 4, same process). Intrinsics rather than
// ATen's vectors: they have no bf16 dot product.
__attribute__((noinline, target("avx512bf16"))) void micro_kernel(const uint32_t* __restrict a, int64_t lda,
                                                                   int64_t rows, const uint32_t* __restrict panel,
                                                                   int64_t K, float* __restrict tile,
                                                                   bool accumulate) {
  const auto row = [&](int64_t r) { return a + std::min(r, rows - 1) * lda; };
  const uint32_t *a0 = a, *a1 = row(1), *a2 = row(2), *a3 = row(3), *a4 = row(4), *a5 = row(5);
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (accumulate) {
    c00 = _mm512_loadu_ps(tile), c01 = _mm512_loadu_ps(tile + 16), c10 = _mm512_loadu_ps(tile + NR);
    c11 = _mm512_loadu_ps(tile + NR + 16), c20 = _mm512_loadu_ps(tile + 2 * NR);
    c21 = _mm512_loadu_ps(tile + 2 * NR + 16), c30 = _mm512_loadu_ps(tile + 3 * NR);
    c31 = _mm512_loadu_ps(tile + 3 * NR + 16), c40 = _mm512_loadu_ps(tile + 4 * NR);
    c41 = _mm512_loadu_ps(tile + 4 * NR + 16), c50 = _mm512_loadu_ps(tile + 5 * NR);
    c51 = _mm512_loadu_ps(tile + 5 * NR + 16);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + k * NR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + k * NR + 16);
    __m512bh x = (__m512bh)_mm512_set1_epi32(int(a0[k]));
    c00 = _mm512_dpbf16_ps(c00, x, b0);
    c01 = _mm512_dpbf16_ps(c01, x, b1);
    x = (__m512bh)_mm512_set1_epi32(int(a1[k]));
    c10 = _mm512_dpbf16_ps(c10, x, b0);
    c11 = _mm512_dpbf16_ps(c11, x, b1);
    x = (__m512bh)_mm512_set1_epi32(int(a2[k]));
    c20 = _mm512_dpbf16_ps(c20, x, b0);
    c21 = _mm512_dpbf16_ps(c21, x, b1);
    x = (__m512bh)_mm512_set1_epi32(int(a3[k]));
    c30 = _mm512_dpbf16_ps(c30, x, b0);
    c31 = _mm512_dpbf16_ps(c31, x, b1);
    x = (__m512bh)_mm512_set1_epi32(int(a4[k]));
    c40 = _mm512_dpbf16_ps(c40, x, b0);
    c41 = _mm512_dpbf16_ps(c41, x, b1);
    x = (__m512bh)_mm512_set1_epi32(int(a5[k]));
    c50 = _mm512_dpbf16_ps(c50, x, b0);
    c51 = _mm512_dpbf16_ps(c51, x, b1);
  }
  const __m512 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) _mm512_storeu_ps(tile + r * NR + v * 16, acc[r][v]);
}
#endif

static_assert(!TIMM_CONVMIXER_BF16_DOT || NR == 32, "the bf16 micro-kernel holds a panel row in two 512-bit vectors");

// What a GEMM on bf16 pairs needs, asked by pw_pack and pw_block alike: pairs along K, and the instruction.
void check_pairs(const char* what, int64_t K) {
  TORCH_CHECK(bf16_dot_supported() && K % 2 == 0, what, " needs an even number of input channels (got ", K,
              ") and a CPU with AVX512-BF16 (this one ", bf16_dot_supported() ? "has it" : "has not", ")");
}

struct Problem {
  const void* u;        // M x K words (NHWC rows): float32, or bf16 pairs
  const void* panels;   // ceil(N / NR) x K x NR words, zero beyond N
  const float* bias;    // N
  const float* scale;   // N
  const float* shift;   // N
  void* y;              // M x N, float32 or bfloat16 (run's TO)
  int64_t M, K, N;      // K in words (steps): the input channels, or half of them for bf16 pairs
};

// Rows [m0, m1) of a float32 u as MR-row tiles, tile t at `dst + t * K * MR` (element (k, r) at k * MR + r). A short
// last tile repeats its last row (computed, never written).
void pack_rows(const Problem& p, int64_t m0, int64_t m1, float* dst) {
  for (int64_t m = m0; m < m1; m += MR, dst += p.K * MR) {
    const int64_t last = std::min<int64_t>(MR, m1 - m) - 1;
    for (int r = 0; r < MR; ++r) {
      const float* src = static_cast<const float*>(p.u) + (m + std::min<int64_t>(r, last)) * p.K;
      for (int64_t k = 0; k < p.K; ++k) dst[k * MR + r] = src[k];
    }
  }
}

// Part `part` of `parts` of the `words` words at `next` (a panel slice the micro-kernel reads next), asked for
// into L1 a cache line at a time.
template <typename W>
inline void prefetch_part(const W* next, int64_t words, int64_t part, int64_t parts) {
  constexpr int64_t LINE = 64 / sizeof(W);
  const int64_t lines = (words + LINE - 1) / LINE, per = (lines + parts - 1) / parts;
  for (int64_t l = part * per; l < std::min(lines, (part + 1) * per); ++l) __builtin_prefetch(next + l * LINE, 0, 3);
}

// Bias, activation and BatchNorm affine on R rows of a finished tile, written to rows m.. of output channels
// [n0, n0 + cols) (cols <= NR).
template <int ACT, typename TO>
void epilogue(const Problem& p, const float* tile, int64_t m, int64_t R, int64_t n0, int64_t cols) {
  TO* const y = static_cast<TO*>(p.y);
  for (int64_t v = 0; v * VL < cols; ++v) {
    const Vec b = load_part(p.bias + n0, v, cols), s = load_part(p.scale + n0, v, cols);
    const Vec t = load_part(p.shift + n0, v, cols);
    for (int64_t r = 0; r < R; ++r) {
      const Vec z = Vec::loadu(tile + r * NR + v * VL) + b;
      store_part(at::vec::fmadd(activate<ACT>(z), s, t), y + (m + r) * p.N + n0, v, cols);
    }
  }
}

#if TIMM_CONVMIXER_BF16_DOT
// The epilogue for a bf16 output of the pair GEMM (so on a CPU with AVX512-BF16): the same, the output rounded by
// vcvtneps2bf16, one instruction where ATen's rounding takes eight (it flushes float32 denormals, below 1.2e-38, to
// zero, as vdpbf16ps does).
template <int ACT>
__attribute__((noinline, target("avx512bf16"))) void epilogue_bf16(const Problem& p, const float* tile, int64_t m,
                                                                    int64_t R, int64_t n0, int64_t cols) {
  c10::BFloat16* const y = static_cast<c10::BFloat16*>(p.y) + n0;
  for (int64_t v = 0; v * VL < cols; ++v) {
    const __mmask16 mask = __mmask16((1u << std::min<int64_t>(VL, cols - v * VL)) - 1);
    const Vec b = load_part(p.bias + n0, v, cols), s = load_part(p.scale + n0, v, cols);
    const Vec t = load_part(p.shift + n0, v, cols);
    for (int64_t r = 0; r < R; ++r) {
      const Vec z = Vec::loadu(tile + r * NR + v * VL) + b;
      _mm256_mask_storeu_epi16(y + (m + r) * p.N + v * VL, mask,
                               (__m256i)_mm512_cvtneps_pbh(at::vec::fmadd(activate<ACT>(z), s, t)));
    }
  }
}
#endif

// W: the word a step of K reads, float (float32 u, packed in tiles) or uint32_t (bf16 pairs, read in place)
template <int ACT, typename TO, typename W>
void run(const Problem& p) {
  constexpr bool PACK = std::is_same_v<W, float>;
  // enough work items for the threads (4 each) where M is small: chunks of fewer rows, whole tiles
  const int64_t threads = at::get_num_threads();
  const int64_t mc = std::max<int64_t>(MR, std::min<int64_t>(MC, p.M / (4 * threads) / MR * MR));
  const int64_t chunks = (p.M + mc - 1) / mc, nblocks = (p.N + NC - 1) / NC;
  // the tiles shared out evenly over the chunks (chunk c holds tiles [c * all / chunks, (c + 1) * all / chunks)), so
  // that no thread waits on another's short last chunk: at M = 2048, 96-row chunks left the second thread a
  // third of a chunk less work
  const int64_t all_tiles = (p.M + MR - 1) / MR, tiles = (all_tiles + chunks - 1) / chunks;
  // K in slices only where it is wide: against whole-K packed tiles in the same runs (96-row chunks), slices of 256
  // ran 1.03x-1.08x at K = 1536 but 0.94x-1.04x at 1024 and 0.98x-0.99x at 768. At least 1, so that K = 0 ends
  const int64_t kc = std::max<int64_t>(1, p.K <= WHOLE_K ? p.K : KC);
  const bool prefetch_panels = PREFETCH_PANELS && kc < p.K;
  // items in chunk-major order: a thread's range (at::parallel_for hands out contiguous ones) packs each of its
  // chunks once
  at::parallel_for(0, chunks * nblocks, 1, [&](int64_t begin, int64_t end) {
    // scratch from torch's CPU allocator (64-byte aligned), uninitialised: every use writes before it reads
    const at::Tensor packed_rows = at::empty({PACK ? tiles * MR * p.K : 0}, at::kFloat);
    const at::Tensor tile_sums = at::empty({tiles * MR * NC}, at::kFloat);
    float* const packed = packed_rows.data_ptr<float>();
    const W* const panels = static_cast<const W*>(p.panels);
    float* const sums = tile_sums.data_ptr<float>();
    int64_t packed_chunk = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / nblocks, nb = item % nblocks * NC;
      const int64_t m0 = chunk * all_tiles / chunks * MR, m1 = std::min(p.M, (chunk + 1) * all_tiles / chunks * MR);
      const int64_t nb1 = std::min(p.N, nb + NC);
      const int64_t chunk_tiles = (m1 - m0 + MR - 1) / MR;
      if (PACK && chunk != packed_chunk) {
        pack_rows(p, m0, m1, packed);
        packed_chunk = chunk;
      }
      for (int64_t k0 = 0; k0 == 0 || k0 < p.K; k0 += kc) {  // once at least: K = 0 writes zero sums
        const int64_t kl = std::min(kc, p.K - k0);
        for (int64_t n0 = nb, j = 0; n0 < nb1; n0 += NR, ++j)
          for (int64_t t = 0; t < chunk_tiles; ++t) {
            if (PREFETCH_OUTPUT && k0 + kc >= p.K)  // the last slice: the tile's output lines, for the epilogue
              for (int64_t m = m0 + t * MR; m < std::min(m1, m0 + (t + 1) * MR); ++m)
                __builtin_prefetch(static_cast<const TO*>(p.y) + m * p.N + n0, 0);
            if (prefetch_panels && n0 + NR < nb1)  // the next panel's slice
              prefetch_part(panels + (n0 + NR) * p.K + k0 * NR, kl * NR, t, chunk_tiles);
            else if (prefetch_panels && k0 + kc < p.K)  // the next slice of the item's first panel
              prefetch_part(panels + nb * p.K + (k0 + kc) * NR, std::min(kc, p.K - k0 - kc) * NR, t, chunk_tiles);
            if constexpr (PACK)
              micro_kernel(packed + t * p.K * MR + k0 * MR, panels + n0 * p.K + k0 * NR, kl,
                           sums + (j * tiles + t) * MR * NR, k0 != 0);
            else
              micro_kernel(static_cast<const W*>(p.u) + (m0 + t * MR) * p.K + k0, p.K,
                           std::min<int64_t>(MR, m1 - m0 - t * MR), panels + n0 * p.K + k0 * NR, kl,
                           sums + (j * tiles + t) * MR * NR, k0 != 0);
          }
      }
      for (int64_t n0 = nb, j = 0; n0 < nb1; n0 += NR, ++j)
        for (int64_t t = 0; t < chunk_tiles; ++t) {
          const int64_t m = m0 + t * MR;
          const float* tile = sums + (j * tiles + t) * MR * NR;
          const int64_t rows = std::min<int64_t>(MR, m1 - m), cols = std::min<int64_t>(NR, nb1 - n0);
#if TIMM_CONVMIXER_BF16_DOT
          if constexpr (!PACK && std::is_same_v<TO, c10::BFloat16>) {
            epilogue_bf16<ACT>(p, tile, m, rows, n0, cols);
            continue;
          }
#endif
          epilogue<ACT, TO>(p, tile, m, rows, n0, cols);
        }
    }
  });
}

at::Tensor pw_pack(const at::Tensor& weight) {
  const bool pairs = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(weight.device().is_cpu() && (weight.scalar_type() == at::kFloat || pairs) && weight.dim() == 2,
              "pw_pack: weight must be a 2-d (C_out, C_in) float32 or bfloat16 CPU tensor, got ",
              weight.scalar_type(), " with ", weight.dim(), " dims");
  const int64_t N = weight.size(0), K = weight.size(1);
  if (pairs) check_pairs("pw_pack: a bfloat16 weight", K);
  // (P, K, NR) floats, or (P, K / 2, NR, 2) bf16: NR words per step of K either way
  at::Tensor panels = pairs ? at::zeros({(N + NR - 1) / NR, K / 2, NR, 2}, weight.options())
                            : at::zeros({(N + NR - 1) / NR, K, NR}, weight.options());
  const at::Tensor w = weight.contiguous();
  if (pairs) {
    const c10::BFloat16* src = w.data_ptr<c10::BFloat16>();
    c10::BFloat16* dst = panels.data_ptr<c10::BFloat16>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) dst[((n / NR * K / 2 + k / 2) * NR + n % NR) * 2 + k % 2] = src[n * K + k];
    return panels;
  }
  const float* src = w.data_ptr<float>();
  float* dst = panels.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) dst[(n / NR * K + k) * NR + n % NR] = src[n * K + k];
  return panels;
}

void pw_block(const at::Tensor& u, const at::Tensor& panels, const at::Tensor& bias, const at::Tensor& scale,
              const at::Tensor& shift, int64_t act, const at::Tensor& out) {
  const bool pairs = u.scalar_type() == at::kBFloat16;
  TORCH_CHECK(u.device().is_cpu() && (u.scalar_type() == at::kFloat || pairs) && u.dim() == 4,
              "pw_block: u must be a 4-d float32 or bfloat16 CPU tensor, got ", u.scalar_type(), " with ", u.dim(),
              " dims");
  TORCH_CHECK(u.is_contiguous(at::MemoryFormat::ChannelsLast), "pw_block: u must be channels_last");
  const int64_t K = u.size(1);
  if (pairs) check_pairs("pw_block: a bfloat16 u", K);
  const int64_t steps = pairs ? K / 2 : K;
  const bool packed_so = pairs ? panels.dim() == 4 && panels.size(3) == 2 : panels.dim() == 3;
  TORCH_CHECK(panels.device().is_cpu() && panels.scalar_type() == u.scalar_type() && panels.is_contiguous() &&
              packed_so && panels.size(1) == steps && panels.size(2) == NR,
              "pw_block: panels must be pw_pack's output for ", K, " input channels in u's dtype ", u.scalar_type(),
              " (shape (P, ", steps, ", ", NR, pairs ? ", 2" : "", ")), got ", panels.scalar_type(), " ",
              panels.sizes());
  const int64_t N = out.dim() == 4 ? out.size(1) : -1;
  TORCH_CHECK(out.device().is_cpu() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) &&
              out.dim() == 4 && out.size(0) == u.size(0) && out.size(2) == u.size(2) && out.size(3) == u.size(3) &&
              out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "pw_block: out must be a channels_last float32 or bfloat16 CPU tensor of u's batch and spatial size");
  TORCH_CHECK(panels.size(0) == (N + NR - 1) / NR, "pw_block: panels hold ", panels.size(0) * NR,
              " output channels, out has ", N);
  for (const at::Tensor* t : {&bias, &scale, &shift})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N,
                "pw_block: bias, scale and shift must be contiguous float32 CPU tensors of ", N, " values");
  TORCH_CHECK(act >= IDENTITY && act <= SILU, "pw_block: unknown activation code ", act);
  TORCH_CHECK(!out.is_same(u), "pw_block: out must not be u (every output reads a whole input row)");
  const Problem p{u.data_ptr(), panels.data_ptr(), bias.data_ptr<float>(), scale.data_ptr<float>(),
                  shift.data_ptr<float>(), out.data_ptr(), u.size(0) * u.size(2) * u.size(3), steps, N};
  if (out.numel() == 0) return;
  with_activation(act, [&](auto a) {
    constexpr int A = decltype(a)::value;
    const bool bf16_out = out.scalar_type() == at::kBFloat16;
#if TIMM_CONVMIXER_BF16_DOT
    if (pairs) return bf16_out ? run<A, c10::BFloat16, uint32_t>(p) : run<A, float, uint32_t>(p);
#endif
    bf16_out ? run<A, c10::BFloat16, float>(p) : run<A, float, float>(p);
  });
}

// How many strong references the storage under `t` has: 1 when `t` is its only holder. No Python storage object is
// made to ask (from Python, `t.untyped_storage()` itself is one, and a user's could not be told apart from it).
int64_t storage_use_count(const at::Tensor& t) { return int64_t(t.storage().use_count()); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(timm_convmixer_cpu, m) {
  m.def("pw_pack(Tensor weight) -> Tensor");
  m.def("pw_block(Tensor u, Tensor panels, Tensor bias, Tensor scale, Tensor shift, int act, Tensor(a!) out) -> ()");
  m.def("storage_use_count(Tensor t) -> int");
  // (no tensor argument: one kernel for every backend)
  m.def("bf16_dot_supported() -> bool", &timm_convmixer_cpu::bf16_dot_supported);
}

TORCH_LIBRARY_IMPL(timm_convmixer_cpu, CPU, m) {
  m.impl("pw_pack", &pw_pack);
  m.impl("pw_block", &pw_block);
  m.impl("storage_use_count", &storage_use_count);
}

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
constexpr int64_t KC = 4096 / NR;  // K per slice: a panel's slice (KC x NR floats) is 16 KiB, 256 x 16 on AVX2
constexpr int64_t WHOLE_K = 1024;  // up to this K, one slice (see run)
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

struct Problem {
  const float* u;       // M x K (NHWC rows)
  const float* panels;  // ceil(N / NR) x K x NR, zero beyond N
  const float* bias;    // N
  const float* scale;   // N
  const float* shift;   // N
  void* y;              // M x N, float32 or bfloat16 (run's TO)
  int64_t M, K, N;
};

// Rows [m0, m1) of u as MR-row tiles, tile t at `dst + t * K * MR` (element (k, r) at k * MR + r). A short last
// tile repeats its last row (computed, never written).
void pack_rows(const Problem& p, int64_t m0, int64_t m1, float* dst) {
  for (int64_t m = m0; m < m1; m += MR, dst += p.K * MR) {
    const int64_t last = std::min<int64_t>(MR, m1 - m) - 1;
    for (int r = 0; r < MR; ++r) {
      const float* src = p.u + (m + std::min<int64_t>(r, last)) * p.K;
      for (int64_t k = 0; k < p.K; ++k) dst[k * MR + r] = src[k];
    }
  }
}

// Part `part` of `parts` of the `floats` floats at `next` (a panel slice the micro-kernel reads next), asked for
// into L1 a cache line at a time.
inline void prefetch_part(const float* next, int64_t floats, int64_t part, int64_t parts) {
  constexpr int64_t LINE = 64 / sizeof(float);
  const int64_t lines = (floats + LINE - 1) / LINE, per = (lines + parts - 1) / parts;
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

template <int ACT, typename TO>
void run(const Problem& p) {
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
    const at::Tensor packed_rows = at::empty({tiles * MR * p.K}, at::kFloat);
    const at::Tensor tile_sums = at::empty({tiles * MR * NC}, at::kFloat);
    float* const packed = packed_rows.data_ptr<float>();
    float* const sums = tile_sums.data_ptr<float>();
    int64_t packed_chunk = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / nblocks, nb = item % nblocks * NC;
      const int64_t m0 = chunk * all_tiles / chunks * MR, m1 = std::min(p.M, (chunk + 1) * all_tiles / chunks * MR);
      const int64_t nb1 = std::min(p.N, nb + NC);
      const int64_t chunk_tiles = (m1 - m0 + MR - 1) / MR;
      if (chunk != packed_chunk) {
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
              prefetch_part(p.panels + (n0 + NR) * p.K + k0 * NR, kl * NR, t, chunk_tiles);
            else if (prefetch_panels && k0 + kc < p.K)  // the next slice of the item's first panel
              prefetch_part(p.panels + nb * p.K + (k0 + kc) * NR, std::min(kc, p.K - k0 - kc) * NR, t, chunk_tiles);
            micro_kernel(packed + t * p.K * MR + k0 * MR, p.panels + n0 * p.K + k0 * NR, kl,
                         sums + (j * tiles + t) * MR * NR, k0 != 0);
          }
      }
      for (int64_t n0 = nb, j = 0; n0 < nb1; n0 += NR, ++j)
        for (int64_t t = 0; t < chunk_tiles; ++t) {
          const int64_t m = m0 + t * MR;
          epilogue<ACT, TO>(p, sums + (j * tiles + t) * MR * NR, m, std::min<int64_t>(MR, m1 - m), n0,
                        std::min<int64_t>(NR, nb1 - n0));
        }
    }
  });
}

at::Tensor pw_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "pw_pack: weight must be a 2-d (C_out, C_in) float32 CPU tensor, got ", weight.scalar_type(), " with ",
              weight.dim(), " dims");
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor panels = at::zeros({(N + NR - 1) / NR, K, NR}, weight.options());
  const at::Tensor w = weight.contiguous();
  const float* src = w.data_ptr<float>();
  float* dst = panels.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) dst[(n / NR * K + k) * NR + n % NR] = src[n * K + k];
  return panels;
}

void pw_block(const at::Tensor& u, const at::Tensor& panels, const at::Tensor& bias, const at::Tensor& scale,
              const at::Tensor& shift, int64_t act, const at::Tensor& out) {
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.dim() == 4,
              "pw_block: u must be a 4-d float32 CPU tensor, got ", u.scalar_type(), " with ", u.dim(), " dims");
  TORCH_CHECK(u.is_contiguous(at::MemoryFormat::ChannelsLast), "pw_block: u must be channels_last");
  const int64_t K = u.size(1);
  TORCH_CHECK(panels.device().is_cpu() && panels.scalar_type() == at::kFloat && panels.is_contiguous() &&
              panels.dim() == 3 && panels.size(1) == K && panels.size(2) == NR,
              "pw_block: panels must be pw_pack's output for ", K, " input channels (shape (P, ", K, ", ", NR,
              ")), got ", panels.sizes());
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
  const Problem p{u.data_ptr<float>(), panels.data_ptr<float>(), bias.data_ptr<float>(), scale.data_ptr<float>(),
                  shift.data_ptr<float>(), out.data_ptr(), u.size(0) * u.size(2) * u.size(3), K, N};
  if (out.numel() == 0) return;
  with_activation(act, [&](auto a) {
    if (out.scalar_type() == at::kFloat) run<decltype(a)::value, float>(p);
    else run<decltype(a)::value, c10::BFloat16>(p);
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
}

TORCH_LIBRARY_IMPL(timm_convmixer_cpu, CPU, m) {
  m.impl("pw_pack", &pw_pack);
  m.impl("pw_block", &pw_block);
  m.impl("storage_use_count", &storage_use_count);
}

// The pointwise half of an eval-mode ConvMixer block on a CPU, as one GEMM with its epilogue:
//
//     y = scale * act(u @ W^T + bias) + shift        (u: NHWC rows of C_in floats, y: NHWC, float32)
//
// Why a GEMM of our own: the 1x1 convolution holds 76-95% of a ConvMixer's FLOPs. oneDNN's channels_last 1x1
// convolution (with the activation fused) ran at ~110 GFLOP/s on an AVX2 Zen 3 and needs one more pass for the
// BatchNorm affine; onnxruntime's MLAS reached ~135. Here the bias, activation and affine are applied to each
// output tile while it is in registers, and the tile is written once.
//
// Blocking, BLIS-style with the shapes ConvMixer has (M = pixels in the thousands, K = N = C_in = C_out in the
// hundreds): the weight is packed once (pw_pack) into panels of NR output channels, K x NR contiguous floats, so the
// micro-kernel reads it as one stream. Each work item is a chunk of MC rows of u (MC x K floats, kept in L2 while
// every panel passes over it); the micro-kernel computes MR x NR outputs over the whole K (no partial sums written
// out): per k it loads NR weights (2 vectors) and broadcasts MR inputs, 2 x MR FMAs into 12 accumulators that stay
// in registers. Built by timm_convmixer/fast/cpu_kernels.py with dw_block.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_common.h"

namespace {

using namespace timm_convmixer_cpu;

constexpr int MR = 6;        // rows (pixels) per micro-kernel tile
constexpr int NR = 2 * VL;   // output channels per panel: 16 on AVX2, 32 on AVX-512
constexpr int64_t MC = 48;   // rows per work item (12, 24 and 96 measured on Zen 3: within that VM's noise)

// MR x NR outputs over the whole K into `tile` (row stride NR). Twelve named accumulators, not an array: GCC kept
// an array of Vectorized in memory and stored all of it on every k (half the speed, measured).
__attribute__((noinline)) void micro_kernel(const float* const* rows, const float* __restrict panel, int64_t K,
                                            float* __restrict tile) {
  const float *a0 = rows[0], *a1 = rows[1], *a2 = rows[2], *a3 = rows[3], *a4 = rows[4], *a5 = rows[5];
  Vec c00(0.f), c01(0.f), c10(0.f), c11(0.f), c20(0.f), c21(0.f), c30(0.f), c31(0.f), c40(0.f), c41(0.f),
      c50(0.f), c51(0.f);
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = Vec::loadu(panel + k * NR), b1 = Vec::loadu(panel + k * NR + VL);
    Vec a(a0[k]);
    c00 = at::vec::fmadd(a, b0, c00);
    c01 = at::vec::fmadd(a, b1, c01);
    a = Vec(a1[k]);
    c10 = at::vec::fmadd(a, b0, c10);
    c11 = at::vec::fmadd(a, b1, c11);
    a = Vec(a2[k]);
    c20 = at::vec::fmadd(a, b0, c20);
    c21 = at::vec::fmadd(a, b1, c21);
    a = Vec(a3[k]);
    c30 = at::vec::fmadd(a, b0, c30);
    c31 = at::vec::fmadd(a, b1, c31);
    a = Vec(a4[k]);
    c40 = at::vec::fmadd(a, b0, c40);
    c41 = at::vec::fmadd(a, b1, c41);
    a = Vec(a5[k]);
    c50 = at::vec::fmadd(a, b0, c50);
    c51 = at::vec::fmadd(a, b1, c51);
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
  float* y;             // M x N
  int64_t M, K, N;
};

// Rows [m, m + R) (R <= MR) and output channels [n0, n0 + cols) (cols <= NR): the micro-kernel, then the epilogue
// on the tile while it is in L1. A short last tile repeats its last row (computed, never written).
template <int ACT>
void tile_block(const Problem& p, int64_t m, int R, int64_t n0, int64_t cols) {
  alignas(64) float tile[MR * NR];
  const float* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = p.u + (m + std::min(r, R - 1)) * p.K;
  micro_kernel(rows, p.panels + n0 * p.K, p.K, tile);
  for (int64_t v = 0; v * VL < cols; ++v) {
    const Vec b = load_part(p.bias + n0, v, cols), s = load_part(p.scale + n0, v, cols);
    const Vec t = load_part(p.shift + n0, v, cols);
    for (int r = 0; r < R; ++r) {
      const Vec z = Vec::loadu(tile + r * NR + v * VL) + b;
      store_part(at::vec::fmadd(activate<ACT>(z), s, t), p.y + (m + r) * p.N + n0, v, cols);
    }
  }
}

template <int ACT>
void run(const Problem& p) {
  const int64_t chunks = (p.M + MC - 1) / MC;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t m0 = chunk * MC, m1 = std::min(p.M, m0 + MC);
      for (int64_t n0 = 0; n0 < p.N; n0 += NR)
        for (int64_t m = m0; m < m1; m += MR)
          tile_block<ACT>(p, m, int(std::min<int64_t>(MR, m1 - m)), n0, std::min<int64_t>(NR, p.N - n0));
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
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 4 &&
              out.size(0) == u.size(0) && out.size(2) == u.size(2) && out.size(3) == u.size(3) &&
              out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "pw_block: out must be a channels_last float32 CPU tensor of u's batch and spatial size");
  TORCH_CHECK(panels.size(0) == (N + NR - 1) / NR, "pw_block: panels hold ", panels.size(0) * NR,
              " output channels, out has ", N);
  for (const at::Tensor* t : {&bias, &scale, &shift})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N,
                "pw_block: bias, scale and shift must be contiguous float32 CPU tensors of ", N, " values");
  TORCH_CHECK(act >= IDENTITY && act <= SILU, "pw_block: unknown activation code ", act);
  TORCH_CHECK(!out.is_same(u), "pw_block: out must not be u (every output reads a whole input row)");
  const Problem p{u.data_ptr<float>(), panels.data_ptr<float>(), bias.data_ptr<float>(), scale.data_ptr<float>(),
                  shift.data_ptr<float>(), out.data_ptr<float>(), u.size(0) * u.size(2) * u.size(3), K, N};
  if (out.numel() == 0) return;
  with_activation(act, [&](auto a) { run<decltype(a)::value>(p); });
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

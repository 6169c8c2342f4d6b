// The depthwise convolution's weight and bias gradients on a CPU, for the memory-lean training block's backward:
//
//     grad_w[c, i, j] = sum over n, h, w of grad[n, h, w, c] * x[n, h + i - pad, w + j - pad, c]   (zero outside)
//     grad_b[c]       = sum over n, h, w of grad[n, h, w, c]                                         (NHWC, float32)
//
// Why a kernel of our own: ATen's weight gradient for a depthwise convolution took 3.7x-18x its forward at ConvMixer's
// shapes on an AVX2 Zen 3 (8 x 768 x 32 x 32, k = 7: 93 ms channels_last and 280 ms NCHW against a 21 ms forward;
// 1536 channels, k = 9: 379 / 1026 ms), the largest single cost of a CPU training step after the pointwise GEMMs,
// for as many FLOPs as the forward. A work item is one block of VL channels of one image, copied once into a
// zero-padded plane (so no tap needs a bounds check) beside the same block of the gradient; each tap row of each
// output row then sweeps the row with k accumulators in registers, one per tap column, each gradient vector loaded
// once for all k of them. Items of the same channel block run on the same thread, one after the other, adding into
// that block's sums, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace timm_convmixer_cpu;

// The copy into the planes walks pixels C floats apart, too far for the hardware prefetchers to follow: on AVX-512
// builds the lines AHEAD_ROWS image rows on are asked for into L2 as each pixel is copied (as dw_block does). Against
// no prefetch, alternating processes (3 each, Zen 4): 1.36x / 1.25x / 1.14x at 64 x 256 x 16 x 16 k5, 8 x 768 x 32 x
// 32 k7, 64 x 256 x 32 x 32 k9; one row ahead 1.20x / 1.26x / 1.10x; into L1 no faster than none. AVX2 builds, not
// measured there, copy as before.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t AHEAD_ROWS = 2;
#else
constexpr int64_t AHEAD_ROWS = 0;
#endif

struct Problem {
  const float* x;     // N, H, W, C
  const float* grad;  // N, H, W, C
  float* grad_w;      // C, k, k
  float* grad_b;      // C
  int64_t N, H, W, C, k, pad;
};

// Adds one output row's products to the k sums of tap row i: sums[j] += sum over w of g[w] * xs[w + j].
// K > 0: the kernel size, its k accumulators held in registers across the row; K == 0: any k, one tap at a time.
template <int K>
inline void row_taps(const float* g, const float* xs, int64_t W, int64_t k, Vec* sums) {
  if constexpr (K > 0) {
    Vec acc[K];
    for (int j = 0; j < K; ++j) acc[j] = Vec(0.f);
    for (int64_t w = 0; w < W; ++w) {
      const Vec gv = Vec::loadu(g + w * VL);
      const float* xw = xs + w * VL;
      for (int j = 0; j < K; ++j) acc[j] = at::vec::fmadd(gv, Vec::loadu(xw + j * VL), acc[j]);
    }
    for (int j = 0; j < K; ++j) sums[j] = sums[j] + acc[j];
  } else {
    for (int64_t j = 0; j < k; ++j) {
      Vec acc(0.f);
      for (int64_t w = 0; w < W; ++w) acc = at::vec::fmadd(Vec::loadu(g + w * VL), Vec::loadu(xs + (w + j) * VL), acc);
      sums[j] = sums[j] + acc;
    }
  }
}

template <int K>
void run(const Problem& p) {
  const int64_t blocks = (p.C + VL - 1) / VL, Hp = p.H + p.k - 1, Wp = p.W + p.k - 1;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> plane(Hp * Wp * VL, 0.f), gplane(p.H * p.W * VL);
    std::vector<Vec> sums(p.k * p.k);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * VL, nc = std::min<int64_t>(VL, p.C - c0);
      std::fill(sums.begin(), sums.end(), Vec(0.f));
      Vec bias_sum(0.f);
      for (int64_t n = 0; n < p.N; ++n) {
        // this channel block of image n: x into the padded plane's interior (its border stays zero), grad beside it
        for (int64_t h = 0; h < p.H; ++h) {
          const bool ahead = AHEAD_ROWS > 0 && (n * p.H + h) + AHEAD_ROWS < p.N * p.H;
          for (int64_t w = 0; w < p.W; ++w) {
            const int64_t at = ((n * p.H + h) * p.W + w) * p.C + c0;
            if (ahead) {
              __builtin_prefetch(p.x + at + AHEAD_ROWS * p.W * p.C, 0, 2);
              __builtin_prefetch(p.grad + at + AHEAD_ROWS * p.W * p.C, 0, 2);
            }
            load_part(p.x + at, 0, nc).store(plane.data() + ((h + p.pad) * Wp + w + p.pad) * VL);
            const Vec gv = load_part(p.grad + at, 0, nc);
            gv.store(gplane.data() + (h * p.W + w) * VL);
            bias_sum = bias_sum + gv;
          }
        }
        for (int64_t h = 0; h < p.H; ++h)
          for (int64_t i = 0; i < p.k; ++i)
            row_taps<K>(gplane.data() + h * p.W * VL, plane.data() + (h + i) * Wp * VL, p.W, p.k,
                        sums.data() + i * p.k);
      }
      float lanes[VL];
      for (int64_t t = 0; t < p.k * p.k; ++t) {
        sums[t].store(lanes);
        for (int64_t l = 0; l < nc; ++l) p.grad_w[(c0 + l) * p.k * p.k + t] = lanes[l];
      }
      bias_sum.store(lanes);
      for (int64_t l = 0; l < nc; ++l) p.grad_b[c0 + l] = lanes[l];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dw_weight_grad(const at::Tensor& x, const at::Tensor& grad, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "dw_weight_grad: x must be a 4-d float32 CPU tensor, got ", x.scalar_type(), " with ", x.dim(), " dims");
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.sizes() == x.sizes(),
              "dw_weight_grad: grad must be a float32 CPU tensor of x's shape");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) && grad.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dw_weight_grad: x and grad must be channels_last");
  TORCH_CHECK(k >= 1 && k <= 64, "dw_weight_grad: kernel size must be 1..64, got ", k);
  const int64_t C = x.size(1);
  at::Tensor grad_w = at::empty({C, 1, k, k}, x.options());
  at::Tensor grad_b = at::empty({C}, x.options());
  const Problem p{x.data_ptr<float>(), grad.data_ptr<float>(), grad_w.data_ptr<float>(), grad_b.data_ptr<float>(),
                  x.size(0), x.size(2), x.size(3), C, k, (k - 1) / 2};
  switch (k) {  // ConvMixer's kernel sizes keep their accumulators in registers
    case 5: run<5>(p); break;
    case 7: run<7>(p); break;
    case 8: run<8>(p); break;
    case 9: run<9>(p); break;
    default: run<0>(p);
  }
  return {grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(timm_convmixer_cpu, m) {
  m.def("dw_weight_grad(Tensor x, Tensor grad, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(timm_convmixer_cpu, CPU, m) { m.impl("dw_weight_grad", &dw_weight_grad); }

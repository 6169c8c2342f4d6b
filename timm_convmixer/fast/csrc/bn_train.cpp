// A training-mode ConvMixer step `out = residual + mask[n] * bn(act(t))` (BatchNorm on the batch's statistics) on a
// CPU, in three kernels over the activations as rows [N*H*W, C] (channels_last float32):
//
//     bn_act_stats     one read of t: per channel, the mean and biased variance of act(t)
//     bn_act_apply     one read of t (and the residual), one write: residual + mask[n] * (scale * act(t) + shift)
//                      (float32, or rounded to bf16 for a bf16 GEMM)
//     bn_act_backward  two reads of grad and t, one write: the gradient wrt t (activation's slope and the mask
//                      folded in; float32, or rounded to bf16 for a bf16 GEMM; optionally its per-channel sums,
//                      the bias gradient of the convolution before) and the BatchNorm weight's and bias's
//
// Why: for the memory-lean training block on a CPU, torch's kernels make an activation pass, BatchNorm's statistics
// and normalisation passes, a drop-path multiply and a residual add per step in forward, and an activation, a
// BatchNorm backward and an activation backward in backward, each a full read and write of a tensor: with the
// block's recomputation these elementwise passes took half of a training step at the CIFAR model's shapes on an AVX2
// Zen 3 (64 x 256 x 16 x 16), a third at 768 channels. Here each step reads its input twice and writes once.
//
// Sums are taken in float over runs of RUN rows and in double over a chunk's runs and then over chunks, in chunk order:
// the result is the same bits on any number of threads. Statistics are of act(t) shifted by its mean over the first
// chunk, so that the variance does not cancel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace timm_convmixer_cpu;

constexpr int64_t CHUNK = 64;  // rows of one work item of the statistics passes
constexpr int64_t RUN = 8;     // rows summed in float before their sums are added in double

struct Rows {
  int64_t M, C, per_sample;  // rows, channels, rows of one image (H * W: the drop-path mask is per image)
};

Rows rows_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4, name,
              ": expected a 4-d float32 CPU tensor, got ", t.scalar_type(), " with ", t.dim(), " dims");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name, ": expected a channels_last tensor");
  return {t.numel() / t.size(1), t.size(1), t.size(2) * t.size(3)};
}

void check_like(const at::Tensor& other, const at::Tensor& t, const char* name, const char* what) {
  TORCH_CHECK(other.scalar_type() == at::kFloat && other.sizes() == t.sizes() &&
                  other.is_contiguous(at::MemoryFormat::ChannelsLast),
              name, ": ", what, " must be a channels_last float32 tensor of t's shape");
}

const float* vector_of(const std::optional<at::Tensor>& v, int64_t n, const char* name, const char* what) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->scalar_type() == at::kFloat && v->is_contiguous() && v->numel() == n, name, ": ", what,
              " must hold ", n, " contiguous float32 values");
  return v->data_ptr<float>();
}

// Per channel, the sums over chunk `chunk`'s rows of f(row, vector index) -> (first, second), into `out` [2, C]:
// the statistics passes' inner loop, row by row across every vector of channels (the rows' memory order), RUN rows
// summed in float and each run's sums added in double (in float over a whole chunk, the sums of a 768-channel ReLU
// model's gradients came out 5x further from float64 than eager's). Going down the chunk a vector of channels at a
// time, each run's lanes added to double one by one, the statistics pass took 1.1x-2.3x and the backward 1.1x-1.3x
// as long (64 x 256 x 16 x 16 and 8 x 768 x 32 x 32, Zen 4) for the same sums in the same order (the same bits).
// SUMS = 1: the first only (f's second is a dummy), `out` [C].
template <int SUMS = 2, typename F>
void chunk_sums(const Rows& r, int64_t chunk, double* out, F&& f) {
  static_assert(SUMS == 1 || SUMS == 2, "chunk_sums: one or two sums");
  const int64_t r0 = chunk * CHUNK, r1 = std::min(r.M, r0 + CHUNK), nv = (r.C + VL - 1) / VL, width = nv * VL;
  thread_local std::vector<float> run_sums;  // [SUMS, width]: the current run's float sums
  thread_local std::vector<double> sums;     // [SUMS, width]: the chunk's
  run_sums.resize(SUMS * width);
  sums.assign(SUMS * width, 0.);
  float* s1p = run_sums.data();
  float* s2p = s1p + width;
  for (int64_t run = r0; run < r1; run += RUN) {
    std::fill(run_sums.begin(), run_sums.begin() + SUMS * width, 0.f);
    for (int64_t row = run; row < std::min(r1, run + RUN); ++row)
      for (int64_t v = 0; v < nv; ++v) {
        Vec s1 = Vec::loadu(s1p + v * VL), s2;
        if constexpr (SUMS == 2) s2 = Vec::loadu(s2p + v * VL);
        f(row, v, s1, s2);
        s1.store(s1p + v * VL);
        if constexpr (SUMS == 2) s2.store(s2p + v * VL);
      }
    for (int64_t c = 0; c < SUMS * width; ++c) sums[c] += run_sums[c];
  }
  std::copy(sums.begin(), sums.begin() + r.C, out);
  if constexpr (SUMS == 2) std::copy(sums.begin() + width, sums.begin() + width + r.C, out + r.C);
}

// The chunks' sums [chunks, n, C] added in chunk order: [n, C].
std::vector<double> total(const std::vector<double>& parts, int64_t chunks, int64_t C, int64_t n = 2) {
  std::vector<double> sums(n * C, 0.);
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t c = c0; c < c1; ++c) sums[j * C + c] += parts[(k * n + j) * C + c];
  });
  return sums;
}

template <int ACT>
void stats(const float* t, const Rows& r, double* mean, double* var) {
  // the shift: act(t)'s mean over the first chunk, close to the batch's, so that the shifted sums do not cancel
  const int64_t chunks = (r.M + CHUNK - 1) / CHUNK;
  std::vector<double> first(2 * r.C);
  chunk_sums(r, 0, first.data(), [&](int64_t row, int64_t v, Vec& s1, Vec&) {
    s1 = s1 + activate<ACT>(load_part(t + row * r.C, v, r.C));
  });
  std::vector<float> shift(r.C);
  for (int64_t c = 0; c < r.C; ++c) shift[c] = float(first[c] / std::min(r.M, CHUNK));
  std::vector<double> parts(chunks * 2 * r.C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      chunk_sums(r, k, parts.data() + k * 2 * r.C, [&](int64_t row, int64_t v, Vec& s1, Vec& s2) {
        const Vec d = activate<ACT>(load_part(t + row * r.C, v, r.C)) - load_part(shift.data(), v, r.C);
        s1 = s1 + d;
        s2 = at::vec::fmadd(d, d, s2);
      });
  });
  const std::vector<double> sums = total(parts, chunks, r.C);
  for (int64_t c = 0; c < r.C; ++c) {
    const double m = sums[c] / r.M;  // the mean of act(t) - shift
    mean[c] = shift[c] + m;
    var[c] = std::max(sums[r.C + c] / r.M - m * m, 0.);
  }
}

std::tuple<at::Tensor, at::Tensor> bn_act_stats(const at::Tensor& t, int64_t act) {
  const Rows r = rows_of(t, "bn_act_stats");
  TORCH_CHECK(r.M > 0, "bn_act_stats: t is empty");
  at::Tensor mean = at::empty({r.C}, t.options().dtype(at::kDouble));
  at::Tensor var = at::empty({r.C}, t.options().dtype(at::kDouble));
  with_activation(act, [&](auto a) {
    stats<decltype(a)::value>(t.data_ptr<float>(), r, mean.data_ptr<double>(), var.data_ptr<double>());
  });
  return {mean, var};
}

template <int ACT, typename Out>
void apply(const float* t, const Rows& r, const float* scale, const float* shift, const float* mask,
           const float* residual, Out* out) {
  const int64_t nv = (r.C + VL - 1) / VL;
  at::parallel_for(0, r.M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * r.C;
      const Vec m(mask != nullptr ? mask[row / r.per_sample] : 1.f);
      for (int64_t v = 0; v < nv; ++v) {
        Vec y = at::vec::fmadd(load_part(scale, v, r.C), activate<ACT>(load_part(t + base, v, r.C)),
                               load_part(shift, v, r.C));
        if (mask != nullptr) y = y * m;
        if (residual != nullptr) y = y + load_part(residual + base, v, r.C);
        store_part(y, out + base, v, r.C);
      }
    }
  });
}

void bn_act_apply(const at::Tensor& t, int64_t act, const at::Tensor& scale, const at::Tensor& shift,
                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& residual, at::Tensor& out) {
  const Rows r = rows_of(t, "bn_act_apply");
  // out: float32, or bfloat16 (rounded once on store) where it feeds a bf16 GEMM and nothing else
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.sizes() == t.sizes() &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bn_act_apply: out must be a channels_last float32 or bfloat16 tensor of t's shape");
  TORCH_CHECK(out.data_ptr() != t.data_ptr(), "bn_act_apply: out must not be t");
  if (residual.has_value()) check_like(*residual, t, "bn_act_apply", "residual");
  const float* m = vector_of(mask, t.size(0), "bn_act_apply", "mask");
  const float* sc = vector_of(scale, r.C, "bn_act_apply", "scale");
  const float* sh = vector_of(shift, r.C, "bn_act_apply", "shift");
  const float* res = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  with_activation(act, [&](auto a) {
    if (out.scalar_type() == at::kBFloat16)
      apply<decltype(a)::value>(t.data_ptr<float>(), r, sc, sh, m, res, out.data_ptr<c10::BFloat16>());
    else
      apply<decltype(a)::value>(t.data_ptr<float>(), r, sc, sh, m, res, out.data_ptr<float>());
  });
}

template <int ACT, typename Out>
void backward(const float* grad, const float* t, const Rows& r, const float* mean, const float* invstd,
              const float* weight, const float* mask, Out* grad_t, float* grad_weight, float* grad_bias,
              float* grad_t_sums) {
  const int64_t nv = (r.C + VL - 1) / VL, chunks = (r.M + CHUNK - 1) / CHUNK;
  std::vector<double> parts(chunks * 2 * r.C);
  // per channel: sum of g and of g * (act(t) - mean), g the gradient reaching the normalisation (mask applied)
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      chunk_sums(r, k, parts.data() + k * 2 * r.C, [&](int64_t row, int64_t v, Vec& s1, Vec& s2) {
        Vec g = load_part(grad + row * r.C, v, r.C);
        if (mask != nullptr) g = g * Vec(mask[row / r.per_sample]);
        const Vec centred = activate<ACT>(load_part(t + row * r.C, v, r.C)) - load_part(mean, v, r.C);
        s1 = s1 + g;
        s2 = at::vec::fmadd(g, centred, s2);
      });
  });
  const std::vector<double> sums = total(parts, chunks, r.C);
  // d act = A * (g - mean of g) + D * (act(t) - mean): BatchNorm's backward on batch statistics, its sums folded per
  // channel, in the centred form that does not cancel (as ATen's)
  std::vector<float> A(r.C), G(r.C), D(r.C);
  for (int64_t c = 0; c < r.C; ++c) {
    const double is = invstd[c], a = (weight != nullptr ? weight[c] : 1.) * is;
    A[c] = float(a);
    G[c] = float(sums[c] / r.M);
    D[c] = float(-a * is * is * sums[r.C + c] / r.M);
    grad_weight[c] = float(sums[r.C + c] * is);
    grad_bias[c] = float(sums[c]);
  }
  // the gradient wrt t at one row's vector v, stored (rounded once where Out is bf16); returned in float32
  const auto grad_at = [&](int64_t row, int64_t v) {
    const int64_t base = row * r.C;
    Vec a, slope;
    activate_with_slope<ACT>(load_part(t + base, v, r.C), a, slope);
    Vec g = load_part(grad + base, v, r.C);
    if (mask != nullptr) g = g * Vec(mask[row / r.per_sample]);
    const Vec d_act = at::vec::fmadd(load_part(A.data(), v, r.C), g - load_part(G.data(), v, r.C),
                                     load_part(D.data(), v, r.C) * (a - load_part(mean, v, r.C)));
    const Vec d = d_act * slope;
    store_part(d, grad_t + base, v, r.C);
    return d;
  };
  if (grad_t_sums == nullptr) {
    at::parallel_for(0, r.M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t v = 0; v < nv; ++v) grad_at(row, v);
    });
    return;
  }
  // with its per-channel sums (of the float32 values, before any rounding), chunked as the statistics: the same bits
  // on any number of threads. A column sum after the pass took longer than this (and torch's float32 sum of a bf16
  // tensor 4x as long as of a float32 one)
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      chunk_sums<1>(r, k, parts.data() + k * r.C,
                    [&](int64_t row, int64_t v, Vec& s1, Vec&) { s1 = s1 + grad_at(row, v); });
  });
  const std::vector<double> t_sums = total(parts, chunks, r.C, 1);
  for (int64_t c = 0; c < r.C; ++c) grad_t_sums[c] = float(t_sums[c]);
}

// the gradient wrt t into `out` (the caller's: a pooled buffer where it is large; float32, or bfloat16, rounded once
// on store, where it feeds a bf16 GEMM and nothing else); returns weight's and bias's, and with `out_sums` out's
// per-channel sums (else an empty tensor)
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad, const at::Tensor& t, int64_t act, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mask, const at::Tensor& out,
    bool out_sums) {
  const Rows r = rows_of(t, "bn_act_backward");
  TORCH_CHECK(r.M > 0, "bn_act_backward: t is empty");
  check_like(grad, t, "bn_act_backward", "grad");
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) && out.sizes() == t.sizes() &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bn_act_backward: out must be a channels_last float32 or bfloat16 tensor of t's shape");
  TORCH_CHECK(out.data_ptr() != t.data_ptr(), "bn_act_backward: out must not be t");
  at::Tensor grad_weight = at::empty({r.C}, t.options());
  at::Tensor grad_bias = at::empty({r.C}, t.options());
  at::Tensor sums = at::empty({out_sums ? r.C : 0}, t.options());
  float* s = out_sums ? sums.data_ptr<float>() : nullptr;
  const float* w = vector_of(weight, r.C, "bn_act_backward", "weight");
  const float* m = vector_of(mask, t.size(0), "bn_act_backward", "mask");
  const float* mu = vector_of(mean, r.C, "bn_act_backward", "mean");
  const float* is = vector_of(invstd, r.C, "bn_act_backward", "invstd");
  with_activation(act, [&](auto a) {
    constexpr int ACT = decltype(a)::value;
    if (out.scalar_type() == at::kBFloat16)
      backward<ACT>(grad.data_ptr<float>(), t.data_ptr<float>(), r, mu, is, w, m, out.data_ptr<c10::BFloat16>(),
                    grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>(), s);
    else
      backward<ACT>(grad.data_ptr<float>(), t.data_ptr<float>(), r, mu, is, w, m, out.data_ptr<float>(),
                    grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>(), s);
  });
  return {grad_weight, grad_bias, sums};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(timm_convmixer_cpu, m) {
  m.def("bn_act_stats(Tensor t, int act) -> (Tensor, Tensor)");
  m.def("bn_act_apply(Tensor t, int act, Tensor scale, Tensor shift, Tensor? mask, Tensor? residual, "
        "Tensor(a!) out) -> ()");
  m.def("bn_act_backward(Tensor grad, Tensor t, int act, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? mask, Tensor(a!) out, bool out_sums=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(timm_convmixer_cpu, CPU, m) {
  m.impl("bn_act_stats", &bn_act_stats);
  m.impl("bn_act_apply", &bn_act_apply);
  m.impl("bn_act_backward", &bn_act_backward);
}

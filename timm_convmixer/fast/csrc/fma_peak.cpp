// This CPU's fp32 arithmetic ceiling, measured: every thread runs fused multiply-adds on independent accumulators
// (more than an FMA's latency times its throughput, so none waits for another), on ATen's vector type for the ISA
// this file is built for, from registers only. Why: the fraction of peak that `bench --engines` reports needs
// the ceiling itself; an sgemm yardstick read 156-270 GFLOP/s on a 2-core AVX-512 VM whose FMA units do ~300, which
// put engines above "100% of peak".
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>

#include "cpu_common.h"

namespace {

using namespace timm_convmixer_cpu;

// Accumulators and the two operands must all fit in registers: AVX2 has 16 ymm, AVX-512 32 zmm. With 16 accumulators
// on AVX2 GCC kept some on the stack, and the probe read 87 GFLOP/s on a 2-core Zen 3 whose FMA units do ~190 (12
// is still more than Zen 3's 4-cycle latency times 2 FMAs a cycle).
constexpr int ACCUMULATORS = VL == 8 ? 12 : 16;

// Runs `per_thread` rounds of ACCUMULATORS vector FMAs on each of ATen's threads at once; returns GFLOP/s (2 per
// lane per FMA), the best of `repeats` runs.
double fma_peak_gflops(int64_t per_thread, int64_t repeats) {
  TORCH_CHECK(per_thread > 0 && repeats > 0, "fma_peak_gflops: per_thread and repeats must be positive, got ",
              per_thread, " and ", repeats);
  const int64_t threads = at::get_num_threads();
  std::atomic<float> sink{0.f};  // the sums leave the loop, so the compiler keeps it
  double best = 0.;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        Vec acc[ACCUMULATORS];
        const Vec a(1.0000001f), b(1e-7f);
        for (int i = 0; i < ACCUMULATORS; ++i) acc[i] = Vec(float(i + t));
        for (int64_t n = 0; n < per_thread; ++n) {
#pragma GCC unroll 16
          for (int i = 0; i < ACCUMULATORS; ++i) acc[i] = at::vec::fmadd(acc[i], a, b);
        }
        Vec sum(0.f);
        for (int i = 0; i < ACCUMULATORS; ++i) sum = sum + acc[i];
        float lanes[VL];
        sum.store(lanes);
        sink.store(sink.load() + lanes[0]);
      }
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(per_thread) * ACCUMULATORS * VL * 2 * threads / s / 1e9);
  }
  return sink.load() == -1.f ? 0. : best;  // never -1: the sums are positive
}

}  // namespace

// no tensor arguments, so no dispatch key to choose by: one kernel for every backend
TORCH_LIBRARY_FRAGMENT(timm_convmixer_cpu, m) {
  m.def("fma_peak_gflops(int per_thread, int repeats) -> float", &fma_peak_gflops);
}

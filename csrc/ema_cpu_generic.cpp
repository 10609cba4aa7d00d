// Baseline variant of the CPU EMA kernels (see ema_cpu_impl.h): 16-byte vectors (SSE2 on x86-64,
// NEON on AArch64, scalar code elsewhere), compiled with the default target flags.  Also holds the
// single-step recurrence of incremental decoding.
#include <cstdint>
#include <cstdlib>

#include "ema_cpu_kernel.h"

#define EMA_NS generic
#define EMA_VBYTES 16
#define EMA_GFWD 8
#define EMA_GREV 8
#define EMA_GGRAD 4
#include "ema_cpu_impl.h"

namespace megatron_ext_ema {
namespace {

// One decoding step for every (batch, channel): N lanes each, O(B*D*N) work.
template <typename T>
void step_t(const CpuStepArgs<T>& a) {
  const int64_t items = a.B * a.D;
#pragma omp parallel for schedule(static) num_threads(a.nthreads) if (a.nthreads > 1 && items >= 4096)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t d = it % a.D;
    const T xv = a.x[it];
    const T* pb = a.pb + d * a.N;
    const T* q = a.q + d * a.N;
    const T* g = a.g + d * a.N;
    const T* h0 = a.h0 != nullptr ? a.h0 + it * a.N : nullptr;
    T* h1 = a.h1 + it * a.N;
    T acc = T(0);
    for (int64_t n = 0; n < a.N; ++n) {
      const T h = (h0 != nullptr ? q[n] * h0[n] : T(0)) + pb[n] * xv;
      h1[n] = h;
      acc += g[n] * h;
    }
    a.y[it] = acc;
  }
}

}  // namespace

void step_cpu(const CpuStepArgs<float>& a) { step_t<float>(a); }
void step_cpu(const CpuStepArgs<double>& a) { step_t<double>(a); }

}  // namespace megatron_ext_ema

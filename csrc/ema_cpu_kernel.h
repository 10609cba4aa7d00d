// CPU kernels of Mega's multi-dimensional damped EMA (see megatron_ext/modules/mega_ema.py).
//
// Plain C++ (no torch headers): raw pointers in, raw pointers out.  The torch binding is
// ema_cpu.cpp; the kernels are compiled once per instruction set (ema_cpu_avx512.cpp,
// ema_cpu_avx2.cpp, ema_cpu_generic.cpp, all from ema_cpu_impl.h) and picked at run time, so a
// cached build works on any x86-64 (or other) CPU without -march=native.
//
// Problem (per batch b, channel d < D, lane n < N, direction r < dirs):
//
//     h_s[n] = q[n] * h_{s-1}[n] + pb[n] * x_s          (h_{-1} = h0 for r = 0, else 0)
//     y_s   += sum_n g[n] * h_s[n]
//
// where s is the processing step: time t = s for r = 0 (causal) and t = L-1-s for r = 1 (the
// backward half of a bidirectional EMA).  y sums both directions.
//
// Layouts (all contiguous, T = float or double):
//   x, y, dy, dx   [B, L, Dp]   channels last; Dp = D rounded up to a multiple of channel_pad<T>()
//                                (the binding pads; padded channels have zero coefficients)
//   coef           [3, dirs, N, Dp]   pb, q, g, channel-contiguous, zero for channels >= D
//   h0, hL, dhL, dh0  [B, D, N]  (direction 0 only)
//   dcoef          [B, 3, dirs, N, Dp]  per-batch partial gradients of pb, q, g
#pragma once

#include <cstdint>

namespace megatron_ext_ema {

// Channel padding of the [B, L, Dp] buffers: 64 bytes, a multiple of every vector width used.
template <typename T>
constexpr int64_t channel_pad() { return 64 / static_cast<int64_t>(sizeof(T)); }

// Plain aggregates without default member initializers: their (trivial) constructors must not be
// emitted inside the ISA-specific translation units (an AVX-512 copy of an inline function could be
// the one the linker keeps).  Value-initialize them (`CpuProblem p{};`).
struct CpuProblem {
  int64_t B, L, D, Dp, N;
  int dirs;      // 1 = causal, 2 = bidirectional
  int nthreads;  // OpenMP threads for the (batch x channel block) loop
};

template <typename T>
struct CpuFwdArgs {
  const T* x;
  const T* coef;
  const T* h0;  // optional
  T* y;
  T* hL;        // optional: final state of direction 0
};

template <typename T>
struct CpuBwdArgs {
  const T* x;
  const T* dy;
  const T* coef;
  const T* h0;   // optional
  const T* dhL;  // optional: gradient of the final state
  T* dx;
  T* dcoef;
  T* dh0;        // optional
};

// Single decoding step, x [B, D], h0 [B, D, N] (optional), pb/q/g [D, N]:
//   h1 = q * h0 + pb * x;  y = sum_n g * h1.
template <typename T>
struct CpuStepArgs {
  const T* x;
  const T* h0;
  const T* pb;
  const T* q;
  const T* g;
  T* y;
  T* h1;
  int64_t B, D, N;
  int nthreads;
};

// forward / backward return false when a work item's small state buffer could not be allocated.
#define MEGATRON_EXT_EMA_DECLARE_ISA(ns)                                   \
  namespace ns {                                                           \
  bool compiled();                                                         \
  bool forward(const CpuProblem& p, const CpuFwdArgs<float>& a);           \
  bool forward(const CpuProblem& p, const CpuFwdArgs<double>& a);          \
  bool backward(const CpuProblem& p, const CpuBwdArgs<float>& a);          \
  bool backward(const CpuProblem& p, const CpuBwdArgs<double>& a);         \
  }

MEGATRON_EXT_EMA_DECLARE_ISA(avx512)
MEGATRON_EXT_EMA_DECLARE_ISA(avx2)
MEGATRON_EXT_EMA_DECLARE_ISA(generic)

#undef MEGATRON_EXT_EMA_DECLARE_ISA

void step_cpu(const CpuStepArgs<float>& a);
void step_cpu(const CpuStepArgs<double>& a);

}  // namespace megatron_ext_ema

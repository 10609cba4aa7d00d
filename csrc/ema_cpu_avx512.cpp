// AVX-512 variant of the CPU EMA kernels (see ema_cpu_impl.h).  Compiled with a target pragma, so
// the build needs no -march flag; ema_cpu.cpp calls it only when the CPU reports avx512f.
#include <cstdint>
#include <cstdlib>

#include "ema_cpu_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2")
#define EMA_NS avx512
#define EMA_VBYTES 64
#define EMA_GFWD 16
#define EMA_GREV 16
#define EMA_GGRAD 8
#include "ema_cpu_impl.h"
#pragma GCC pop_options
#else
namespace megatron_ext_ema {
namespace avx512 {
bool compiled() { return false; }
bool forward(const CpuProblem&, const CpuFwdArgs<float>&) { return false; }
bool forward(const CpuProblem&, const CpuFwdArgs<double>&) { return false; }
bool backward(const CpuProblem&, const CpuBwdArgs<float>&) { return false; }
bool backward(const CpuProblem&, const CpuBwdArgs<double>&) { return false; }
}  // namespace avx512
}  // namespace megatron_ext_ema
#endif

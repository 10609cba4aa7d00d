// AVX2 + FMA variant of the CPU EMA kernels (see ema_cpu_impl.h).  Compiled with a target pragma, so
// the build needs no -march flag; ema_cpu.cpp calls it only when the CPU reports avx2 and fma.
#include <cstdint>
#include <cstdlib>

#include "ema_cpu_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
#define EMA_NS avx2
#define EMA_VBYTES 32
#define EMA_GFWD 8
#define EMA_GREV 8
#define EMA_GGRAD 4
#include "ema_cpu_impl.h"
#pragma GCC pop_options
#else
namespace megatron_ext_ema {
namespace avx2 {
bool compiled() { return false; }
bool forward(const CpuProblem&, const CpuFwdArgs<float>&) { return false; }
bool forward(const CpuProblem&, const CpuFwdArgs<double>&) { return false; }
bool backward(const CpuProblem&, const CpuBwdArgs<float>&) { return false; }
bool backward(const CpuProblem&, const CpuBwdArgs<double>&) { return false; }
}  // namespace avx2
}  // namespace megatron_ext_ema
#endif

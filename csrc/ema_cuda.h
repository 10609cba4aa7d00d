// CUDA kernels of Mega's multi-dimensional damped EMA: host launchers (implemented in
// ema_cuda_kernel.cu, which includes no torch header, so `nvcc -c csrc/ema_cuda_kernel.cu` builds
// anywhere nvcc does).  The torch binding is ema_cuda.cpp.
//
// Same problem and formulas as the CPU kernels (ema_cpu_kernel.h / ema_cpu_impl.h).  Layouts, all
// contiguous, channels last:
//   x            [B, L, D]   XT = half, bfloat16, float or double
//   y, dy, dx    [B, L, D]   AT = float (double for double x): the accumulation type
//   coef         [3, dirs, N, D]  pb, q, g (AT)
//   h0, hL, dhL, dh0, m_final, sq_final   [B, D, N] (AT, direction 0 only)
//   partial      [B, nchunks, 3, dirs, N, D]  per (batch, chunk) sums P, Q, Gs (AT), see below
//
// Backward outputs (the binding reduces `partial` over batch and chunks and finishes):
//   without h0:  dg = pb * S_P,  dpb = g * S_P + sum_b dhL m_final,  dq = pb * (g * S_Q + sum_b dhL sq_final)
//   with h0:     dg = S_G,       dpb = g * S_P + sum_b dhL m_final,  dq = g * S_Q + sum_b dhL sq_final
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace megatron_ext_ema {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

struct Problem {
  int64_t B, L, D, N;
  int dirs;         // 1 causal, 2 bidirectional
  int64_t chunk;    // chunk length T (see chunk_length)
  int64_t nchunks;  // ceil(L / T)
};

// Chunk length for a problem: enough (batch x chunk x channel) threads to fill a GPU, chunks of at
// least 32 steps.  `backward` asks for fewer chunks (its per-chunk partial sums cost memory).
int64_t chunk_length(int64_t B, int64_t L, int64_t D, bool backward);

// Workspace sizes in elements of the accumulation type.
int64_t forward_workspace(const Problem& p);                 // carries  [B, dirs, nc, N, D]
int64_t backward_workspace(const Problem& p, bool has_h0);   // carries + states
int64_t backward_partial(const Problem& p);                  // partial  [B, nc, 3, dirs, N, D]

// All launchers return cudaSuccess or the first launch error.  Pointers marked optional may be null.
cudaError_t forward(const Problem& p, DType xt, const void* x, const void* coef,
                    const void* h0 /*optional*/, void* y, void* hL /*optional*/, void* workspace,
                    cudaStream_t stream);

cudaError_t backward(const Problem& p, DType xt, const void* x, const void* dy, const void* coef,
                     const void* h0 /*optional*/, const void* dhL /*optional*/, void* dx, void* partial,
                     void* dh0 /*optional*/, void* m_final /*optional, with dhL*/,
                     void* sq_final /*optional, with dhL*/, void* workspace, cudaStream_t stream);

// One decoding step: x [B, D] (XT), h0 [B, D, N] (optional), pb/q/g [D, N], y [B, D], h1 [B, D, N] (AT).
cudaError_t step(int64_t B, int64_t D, int64_t N, DType xt, const void* x, const void* h0, const void* pb,
                 const void* q, const void* g, void* y, void* h1, cudaStream_t stream);

}  // namespace cuda
}  // namespace megatron_ext_ema

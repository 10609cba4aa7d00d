// CUDA kernels of Mega's multi-dimensional damped EMA (declarations and layouts: ema_cuda.h).
// No torch headers: `nvcc -c csrc/ema_cuda_kernel.cu` compiles on any machine with nvcc.
//
// Design: a chunked scan.  The sequence is cut into nc chunks of T steps; with the recurrence
// h_t = q h_{t-1} + pb x_t being linear with a time-invariant q, a chunk maps an incoming state to
// q^len * h_in + (its state from zero), so
//   1. `local`  kernels scan every chunk from a zero state, in parallel over (batch, chunk, channel);
//   2. `carry`  kernels run the short scan over the nc chunk results per (batch, direction, lane,
//               channel), turning them into each chunk's incoming state (and the final state);
//   3. `out`    kernels rescan every chunk from its true incoming state and write y (or dx and the
//               parameter-gradient partial sums).
// A thread owns one (batch, chunk, channel) and walks its chunk sequentially with its lane group
// (up to 16 EMA lanes) in registers; the 32 threads of a warp take 32 adjacent channels, so every
// load / store of the channels-last [B, L, D] tensors is coalesced.  Accumulation is in float
// (double for double inputs) whatever the input type (half, bfloat16, float, double).
//
// The backward pass mirrors the CPU kernel (ema_cpu_impl.h): an adjoint scan
// (lambda = g dy + q lambda_next, dx = sum_n pb lambda, dh0 = q lambda_0) that runs backward in
// processing order, and a forward scan of the sensitivities m = dh/dpb, sq = dh/dq whose
// dy-weighted sums give the parameter gradients.  Both are linear in their carries, so they are
// chunked the same way (the carry of sq picks up len * q^(len-1) times the incoming h or m).
// Nothing but the inputs is saved by the forward pass; no state is ever reconstructed by dividing
// by q.
//
// Why a chunked scan and not Megalodon's recipe (kernel generation + shared-memory FFT convolution
// + a reduction for the final state): it is the same algorithm as the CPU kernel, so the CPU tests
// validate its math and its backward; its work is O(N) per element with no FFT padding and no
// limit on L; y, the final state, the bidirectional half and the prior state all come out of one
// code path; and its memory traffic is two reads of x and one write of y (forward), well below
// the FFT's.  At very long L with small N an FFT convolution could win on raw flops; that is left
// for measurement on a GPU (this file is compile-checked by csrc/check_cuda_compile.sh, not run, in
// CI).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ema_cuda.h"

namespace megatron_ext_ema {
namespace cuda {
namespace {

constexpr int kThreads = 128;

struct Dims {
  int64_t B, L, D, N;
  int dirs;
  int64_t T, nc;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// q^e for e >= 0 by binary exponentiation (log2(e) roundings).
template <typename AT>
__device__ __forceinline__ AT powi(AT q, int64_t e) {
  AT r = AT(1);
  while (e > 0) {
    if (e & 1) r *= q;
    q *= q;
    e >>= 1;
  }
  return r;
}

// e * q^(e-1): the q-derivative of q^e (0 for e = 0).
template <typename AT>
__device__ __forceinline__ AT dpowi(AT q, int64_t e) {
  return e > 0 ? AT(e) * powi(q, e - 1) : AT(0);
}

__device__ __forceinline__ int64_t chunk_len(const Dims& s, int64_t c) {
  const int64_t rest = s.L - c * s.T;
  return rest < s.T ? rest : s.T;
}

// Time of processing step i of chunk c (length len) in direction dir (1 runs backward in time).
__device__ __forceinline__ int64_t step_time(const Dims& s, int dir, int64_t c, int64_t len, int64_t i) {
  return dir == 0 ? c * s.T + i : c * s.T + len - 1 - i;
}

// Index into a [B, dirs, nc, K, N, D] buffer.
__device__ __forceinline__ int64_t bidx(const Dims& s, int64_t b, int dir, int64_t c, int k, int K, int64_t n,
                                        int64_t d) {
  return ((((b * s.dirs + dir) * s.nc + c) * K + k) * s.N + n) * s.D + d;
}

// Coefficients of lanes n0 .. n0+G-1 of (dir, channel d); lanes >= N are zero (they stay 0).
template <typename AT, int G>
__device__ __forceinline__ void load_coef(const AT* __restrict__ coef, const Dims& s, int dir, int64_t n0,
                                          int64_t d, AT* pb, AT* q, AT* g) {
  const int64_t plane = static_cast<int64_t>(s.dirs) * s.N * s.D;
#pragma unroll
  for (int n = 0; n < G; ++n) {
    if (n0 + n < s.N) {
      const int64_t off = (static_cast<int64_t>(dir) * s.N + n0 + n) * s.D + d;
      pb[n] = coef[off];
      q[n] = coef[plane + off];
      g[n] = coef[2 * plane + off];
    } else {
      pb[n] = AT(0);
      q[n] = AT(0);
      g[n] = AT(0);
    }
  }
}

// Thread -> (batch, chunk, channel), channel fastest.
__device__ __forceinline__ bool thread_bcd(const Dims& s, int64_t& b, int64_t& c, int64_t& d) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.B * s.nc * s.D) return false;
  d = idx % s.D;
  c = (idx / s.D) % s.nc;
  b = idx / (s.D * s.nc);
  return true;
}

// Thread -> (batch, direction, lane, channel), channel fastest.
__device__ __forceinline__ bool thread_bdnd(const Dims& s, int64_t& b, int& dir, int64_t& n, int64_t& d) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= s.B * s.dirs * s.N * s.D) return false;
  d = idx % s.D;
  n = (idx / s.D) % s.N;
  dir = static_cast<int>((idx / (s.D * s.N)) % s.dirs);
  b = idx / (s.D * s.N * s.dirs);
  return true;
}

// ===================================================================================== forward
template <typename XT, typename AT, int G>
__global__ void __launch_bounds__(kThreads)
    fwd_local_kernel(const XT* __restrict__ x, const AT* __restrict__ coef, AT* __restrict__ carry, Dims s) {
  int64_t b, c, d;
  if (!thread_bcd(s, b, c, d)) return;
  const int64_t len = chunk_len(s, c);
  const XT* xb = x + b * s.L * s.D + d;
  for (int dir = 0; dir < s.dirs; ++dir) {
    for (int64_t n0 = 0; n0 < s.N; n0 += G) {
      AT pb[G], q[G], g[G], h[G];
      load_coef<AT, G>(coef, s, dir, n0, d, pb, q, g);
#pragma unroll
      for (int n = 0; n < G; ++n) h[n] = AT(0);
      for (int64_t i = 0; i < len; ++i) {
        const AT xv = to_acc(xb[step_time(s, dir, c, len, i) * s.D]);
#pragma unroll
        for (int n = 0; n < G; ++n) h[n] = q[n] * h[n] + pb[n] * xv;
      }
#pragma unroll
      for (int n = 0; n < G; ++n)
        if (n0 + n < s.N) carry[bidx(s, b, dir, c, 0, 1, n0 + n, d)] = h[n];
    }
  }
}

// Chunk results -> incoming state of every chunk (in place); final state of direction 0.
template <typename AT>
__global__ void __launch_bounds__(kThreads)
    fwd_carry_kernel(const AT* __restrict__ coef, const AT* __restrict__ h0, AT* __restrict__ carry,
                     AT* __restrict__ hL, Dims s, bool has_local) {
  int64_t b, n, d;
  int dir;
  if (!thread_bdnd(s, b, dir, n, d)) return;
  const int64_t plane = static_cast<int64_t>(s.dirs) * s.N * s.D;
  const AT q = coef[plane + (static_cast<int64_t>(dir) * s.N + n) * s.D + d];
  const int64_t last = s.L - (s.nc - 1) * s.T;
  const AT p_full = powi(q, s.T), p_last = powi(q, last);
  AT h = (dir == 0 && h0 != nullptr) ? h0[(b * s.D + d) * s.N + n] : AT(0);
  for (int64_t k = 0; k < s.nc; ++k) {
    const int64_t c = dir == 0 ? k : s.nc - 1 - k;
    const int64_t i = bidx(s, b, dir, c, 0, 1, n, d);
    const AT local = has_local ? carry[i] : AT(0);
    carry[i] = h;
    h = (c == s.nc - 1 ? p_last : p_full) * h + local;
  }
  if (dir == 0 && hL != nullptr) hL[(b * s.D + d) * s.N + n] = h;
}

template <typename XT, typename AT, int G>
__global__ void __launch_bounds__(kThreads)
    fwd_out_kernel(const XT* __restrict__ x, const AT* __restrict__ coef, const AT* __restrict__ carry,
                   AT* __restrict__ y, Dims s) {
  int64_t b, c, d;
  if (!thread_bcd(s, b, c, d)) return;
  const int64_t len = chunk_len(s, c);
  const XT* xb = x + b * s.L * s.D + d;
  AT* yb = y + b * s.L * s.D + d;
  for (int dir = 0; dir < s.dirs; ++dir) {
    for (int64_t n0 = 0; n0 < s.N; n0 += G) {
      AT pb[G], q[G], g[G], h[G];
      load_coef<AT, G>(coef, s, dir, n0, d, pb, q, g);
#pragma unroll
      for (int n = 0; n < G; ++n) h[n] = (n0 + n < s.N) ? carry[bidx(s, b, dir, c, 0, 1, n0 + n, d)] : AT(0);
      const bool first = dir == 0 && n0 == 0;
      for (int64_t i = 0; i < len; ++i) {
        const int64_t t = step_time(s, dir, c, len, i);
        const AT xv = to_acc(xb[t * s.D]);
        AT acc = AT(0);
#pragma unroll
        for (int n = 0; n < G; ++n) {
          h[n] = q[n] * h[n] + pb[n] * xv;
          acc += g[n] * h[n];
        }
        AT* yp = yb + t * s.D;
        *yp = first ? acc : *yp + acc;
      }
    }
  }
}

// ==================================================================================== backward
// Local (zero-carry) chunk results: the adjoint carry (reverse processing order) and the
// sensitivity states (m, sq[, h]) (forward processing order).
template <typename XT, typename AT, int G, bool H0>
__global__ void __launch_bounds__(kThreads)
    bwd_local_kernel(const XT* __restrict__ x, const AT* __restrict__ dy, const AT* __restrict__ coef,
                     AT* __restrict__ crbuf, AT* __restrict__ stbuf, Dims s) {
  constexpr int K = H0 ? 3 : 2;
  int64_t b, c, d;
  if (!thread_bcd(s, b, c, d)) return;
  const int64_t len = chunk_len(s, c);
  const XT* xb = x + b * s.L * s.D + d;
  const AT* dyb = dy + b * s.L * s.D + d;
  for (int dir = 0; dir < s.dirs; ++dir) {
    for (int64_t n0 = 0; n0 < s.N; n0 += G) {
      AT pb[G], q[G], g[G], cr[G], m[G], sq[G], h[G];
      load_coef<AT, G>(coef, s, dir, n0, d, pb, q, g);
#pragma unroll
      for (int n = 0; n < G; ++n) {
        cr[n] = AT(0);
        m[n] = AT(0);
        sq[n] = AT(0);
        h[n] = AT(0);
      }
      for (int64_t i = len - 1; i >= 0; --i) {
        const AT dyv = dyb[step_time(s, dir, c, len, i) * s.D];
#pragma unroll
        for (int n = 0; n < G; ++n) cr[n] = q[n] * (g[n] * dyv + cr[n]);
      }
      for (int64_t i = 0; i < len; ++i) {
        const AT xv = to_acc(xb[step_time(s, dir, c, len, i) * s.D]);
#pragma unroll
        for (int n = 0; n < G; ++n) {
          if (H0) {
            sq[n] = q[n] * sq[n] + h[n];
            h[n] = q[n] * h[n] + pb[n] * xv;
          } else {
            sq[n] = q[n] * sq[n] + m[n];
          }
          m[n] = q[n] * m[n] + xv;
        }
      }
#pragma unroll
      for (int n = 0; n < G; ++n) {
        if (n0 + n >= s.N) continue;
        crbuf[bidx(s, b, dir, c, 0, 1, n0 + n, d)] = cr[n];
        stbuf[bidx(s, b, dir, c, 0, K, n0 + n, d)] = m[n];
        stbuf[bidx(s, b, dir, c, 1, K, n0 + n, d)] = sq[n];
        if (H0) stbuf[bidx(s, b, dir, c, 2, K, n0 + n, d)] = h[n];
      }
    }
  }
}

// Chunk results -> incoming carries / states of every chunk (in place); dh0, and the final
// sensitivity states of direction 0 (for the dhL terms).
template <typename AT, bool H0>
__global__ void __launch_bounds__(kThreads)
    bwd_carry_kernel(const AT* __restrict__ coef, const AT* __restrict__ h0, const AT* __restrict__ dhL,
                     AT* __restrict__ crbuf, AT* __restrict__ stbuf, AT* __restrict__ dh0,
                     AT* __restrict__ m_final, AT* __restrict__ sq_final, Dims s) {
  constexpr int K = H0 ? 3 : 2;
  int64_t b, n, d;
  int dir;
  if (!thread_bdnd(s, b, dir, n, d)) return;
  const int64_t plane = static_cast<int64_t>(s.dirs) * s.N * s.D;
  const AT q = coef[plane + (static_cast<int64_t>(dir) * s.N + n) * s.D + d];
  const int64_t last = s.L - (s.nc - 1) * s.T;
  const AT p_full = powi(q, s.T), p_last = powi(q, last);
  const AT dp_full = dpowi(q, s.T), dp_last = dpowi(q, last);
  const int64_t sidx = (b * s.D + d) * s.N + n;

  // Adjoint carry: reverse processing order over the chunks.
  AT cr = (dir == 0 && dhL != nullptr) ? dhL[sidx] : AT(0);
  for (int64_t k = 0; k < s.nc; ++k) {
    const int64_t c = dir == 0 ? s.nc - 1 - k : k;
    const int64_t i = bidx(s, b, dir, c, 0, 1, n, d);
    const AT local = crbuf[i];
    crbuf[i] = cr;
    cr = (c == s.nc - 1 ? p_last : p_full) * cr + local;
  }
  if (dir == 0 && dh0 != nullptr) dh0[sidx] = cr;

  // Sensitivity states: forward processing order.
  AT m = AT(0), sq = AT(0);
  AT h = (H0 && dir == 0 && h0 != nullptr) ? h0[sidx] : AT(0);
  for (int64_t k = 0; k < s.nc; ++k) {
    const int64_t c = dir == 0 ? k : s.nc - 1 - k;
    const AT p = c == s.nc - 1 ? p_last : p_full;
    const AT dp = c == s.nc - 1 ? dp_last : dp_full;
    const int64_t i0 = bidx(s, b, dir, c, 0, K, n, d);
    const int64_t i1 = bidx(s, b, dir, c, 1, K, n, d);
    const AT ml = stbuf[i0], sql = stbuf[i1];
    stbuf[i0] = m;
    stbuf[i1] = sq;
    if (H0) {
      const int64_t i2 = bidx(s, b, dir, c, 2, K, n, d);
      const AT hl = stbuf[i2];
      stbuf[i2] = h;
      sq = p * sq + dp * h + sql;
      h = p * h + hl;
    } else {
      sq = p * sq + dp * m + sql;
    }
    m = p * m + ml;
  }
  if (dir == 0 && m_final != nullptr) {
    m_final[sidx] = m;
    sq_final[sidx] = sq;
  }
}

template <typename XT, typename AT, int G, bool H0>
__global__ void __launch_bounds__(kThreads)
    bwd_out_kernel(const XT* __restrict__ x, const AT* __restrict__ dy, const AT* __restrict__ coef,
                   const AT* __restrict__ crbuf, const AT* __restrict__ stbuf, AT* __restrict__ dx,
                   AT* __restrict__ partial, Dims s) {
  constexpr int K = H0 ? 3 : 2;
  int64_t b, c, d;
  if (!thread_bcd(s, b, c, d)) return;
  const int64_t len = chunk_len(s, c);
  const XT* xb = x + b * s.L * s.D + d;
  const AT* dyb = dy + b * s.L * s.D + d;
  AT* dxb = dx + b * s.L * s.D + d;
  for (int dir = 0; dir < s.dirs; ++dir) {
    // Adjoint scan -> dx.
    for (int64_t n0 = 0; n0 < s.N; n0 += G) {
      AT pb[G], q[G], g[G], cr[G];
      load_coef<AT, G>(coef, s, dir, n0, d, pb, q, g);
#pragma unroll
      for (int n = 0; n < G; ++n) cr[n] = (n0 + n < s.N) ? crbuf[bidx(s, b, dir, c, 0, 1, n0 + n, d)] : AT(0);
      const bool first = dir == 0 && n0 == 0;
      for (int64_t i = len - 1; i >= 0; --i) {
        const int64_t t = step_time(s, dir, c, len, i);
        const AT dyv = dyb[t * s.D];
        AT acc = AT(0);
#pragma unroll
        for (int n = 0; n < G; ++n) {
          const AT lam = g[n] * dyv + cr[n];
          cr[n] = q[n] * lam;
          acc += pb[n] * lam;
        }
        AT* dxp = dxb + t * s.D;
        *dxp = first ? acc : *dxp + acc;
      }
    }
    // Sensitivity scan -> per-(batch, chunk) sums P = sum dy m, Q = sum dy sq, Gs = sum dy h.
    for (int64_t n0 = 0; n0 < s.N; n0 += G) {
      AT pb[G], q[G], g[G], m[G], sq[G], h[G], P[G], Q[G], Gs[G];
      load_coef<AT, G>(coef, s, dir, n0, d, pb, q, g);
#pragma unroll
      for (int n = 0; n < G; ++n) {
        const bool ok = n0 + n < s.N;
        m[n] = ok ? stbuf[bidx(s, b, dir, c, 0, K, n0 + n, d)] : AT(0);
        sq[n] = ok ? stbuf[bidx(s, b, dir, c, 1, K, n0 + n, d)] : AT(0);
        h[n] = (H0 && ok) ? stbuf[bidx(s, b, dir, c, 2 % K, K, n0 + n, d)] : AT(0);
        P[n] = AT(0);
        Q[n] = AT(0);
        Gs[n] = AT(0);
      }
      for (int64_t i = 0; i < len; ++i) {
        const int64_t t = step_time(s, dir, c, len, i);
        const AT xv = to_acc(xb[t * s.D]);
        const AT dyv = dyb[t * s.D];
#pragma unroll
        for (int n = 0; n < G; ++n) {
          if (H0) {
            sq[n] = q[n] * sq[n] + h[n];
            h[n] = q[n] * h[n] + pb[n] * xv;
            Gs[n] += dyv * h[n];
          } else {
            sq[n] = q[n] * sq[n] + m[n];
          }
          m[n] = q[n] * m[n] + xv;
          P[n] += dyv * m[n];
          Q[n] += dyv * sq[n];
        }
      }
      const int64_t cstride = static_cast<int64_t>(s.dirs) * s.N * s.D;  // one of P / Q / Gs
      AT* out = partial + (b * s.nc + c) * 3 * cstride + (static_cast<int64_t>(dir) * s.N + n0) * s.D + d;
#pragma unroll
      for (int n = 0; n < G; ++n) {
        if (n0 + n >= s.N) continue;
        out[n * s.D] = P[n];
        out[cstride + n * s.D] = Q[n];
        out[2 * cstride + n * s.D] = Gs[n];
      }
    }
  }
}

// ======================================================================================== step
template <typename XT, typename AT>
__global__ void __launch_bounds__(kThreads)
    step_kernel(int64_t B, int64_t D, int64_t N, const XT* __restrict__ x, const AT* __restrict__ h0,
                const AT* __restrict__ pb, const AT* __restrict__ q, const AT* __restrict__ g, AT* __restrict__ y,
                AT* __restrict__ h1) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * D) return;
  const int64_t d = idx % D;
  const AT xv = to_acc(x[idx]);
  AT acc = AT(0);
  for (int64_t n = 0; n < N; ++n) {
    const AT h = (h0 != nullptr ? q[d * N + n] * h0[idx * N + n] : AT(0)) + pb[d * N + n] * xv;
    h1[idx * N + n] = h;
    acc += g[d * N + n] * h;
  }
  y[idx] = acc;
}

// ==================================================================================== launchers
inline unsigned int blocks_for(int64_t threads) {
  return static_cast<unsigned int>((threads + kThreads - 1) / kThreads);
}

inline Dims dims_of(const Problem& p) { return Dims{p.B, p.L, p.D, p.N, p.dirs, p.chunk, p.nchunks}; }

inline int lane_group(int64_t N) { return N <= 4 ? 4 : (N <= 8 ? 8 : 16); }

template <typename XT, typename AT, int G>
cudaError_t forward_t(const Problem& p, const void* x, const void* coef, const void* h0, void* y, void* hL,
                      void* workspace, cudaStream_t stream) {
  const Dims s = dims_of(p);
  const XT* xp = static_cast<const XT*>(x);
  const AT* cp = static_cast<const AT*>(coef);
  AT* carry = static_cast<AT*>(workspace);
  // With one chunk and no final state wanted, the incoming state is just h0 (or zero).
  const bool has_local = p.nchunks > 1 || hL != nullptr;
  if (has_local) fwd_local_kernel<XT, AT, G><<<blocks_for(p.B * p.nchunks * p.D), kThreads, 0, stream>>>(xp, cp, carry, s);
  fwd_carry_kernel<AT><<<blocks_for(p.B * p.dirs * p.N * p.D), kThreads, 0, stream>>>(
      cp, static_cast<const AT*>(h0), carry, static_cast<AT*>(hL), s, has_local);
  fwd_out_kernel<XT, AT, G><<<blocks_for(p.B * p.nchunks * p.D), kThreads, 0, stream>>>(
      xp, cp, carry, static_cast<AT*>(y), s);
  return cudaGetLastError();
}

template <typename XT, typename AT, int G, bool H0>
cudaError_t backward_t(const Problem& p, const void* x, const void* dy, const void* coef, const void* h0,
                       const void* dhL, void* dx, void* partial, void* dh0, void* m_final, void* sq_final,
                       void* workspace, cudaStream_t stream) {
  const Dims s = dims_of(p);
  const XT* xp = static_cast<const XT*>(x);
  const AT* dyp = static_cast<const AT*>(dy);
  const AT* cp = static_cast<const AT*>(coef);
  AT* crbuf = static_cast<AT*>(workspace);
  AT* stbuf = crbuf + p.B * p.dirs * p.nchunks * p.N * p.D;
  const unsigned int grid_bcd = blocks_for(p.B * p.nchunks * p.D);
  bwd_local_kernel<XT, AT, G, H0><<<grid_bcd, kThreads, 0, stream>>>(xp, dyp, cp, crbuf, stbuf, s);
  bwd_carry_kernel<AT, H0><<<blocks_for(p.B * p.dirs * p.N * p.D), kThreads, 0, stream>>>(
      cp, static_cast<const AT*>(h0), static_cast<const AT*>(dhL), crbuf, stbuf, static_cast<AT*>(dh0),
      static_cast<AT*>(m_final), static_cast<AT*>(sq_final), s);
  bwd_out_kernel<XT, AT, G, H0><<<grid_bcd, kThreads, 0, stream>>>(xp, dyp, cp, crbuf, stbuf, static_cast<AT*>(dx),
                                                                    static_cast<AT*>(partial), s);
  return cudaGetLastError();
}

template <typename XT, typename AT>
cudaError_t forward_g(const Problem& p, const void* x, const void* coef, const void* h0, void* y, void* hL,
                      void* ws, cudaStream_t st) {
  switch (lane_group(p.N)) {
    case 4: return forward_t<XT, AT, 4>(p, x, coef, h0, y, hL, ws, st);
    case 8: return forward_t<XT, AT, 8>(p, x, coef, h0, y, hL, ws, st);
    default: return forward_t<XT, AT, 16>(p, x, coef, h0, y, hL, ws, st);
  }
}

template <typename XT, typename AT, bool H0>
cudaError_t backward_g(const Problem& p, const void* x, const void* dy, const void* coef, const void* h0,
                       const void* dhL, void* dx, void* partial, void* dh0, void* mf, void* sqf, void* ws,
                       cudaStream_t st) {
  switch (lane_group(p.N)) {
    case 4: return backward_t<XT, AT, 4, H0>(p, x, dy, coef, h0, dhL, dx, partial, dh0, mf, sqf, ws, st);
    case 8: return backward_t<XT, AT, 8, H0>(p, x, dy, coef, h0, dhL, dx, partial, dh0, mf, sqf, ws, st);
    default: return backward_t<XT, AT, 16, H0>(p, x, dy, coef, h0, dhL, dx, partial, dh0, mf, sqf, ws, st);
  }
}

template <typename XT, typename AT>
cudaError_t backward_h(const Problem& p, const void* x, const void* dy, const void* coef, const void* h0,
                       const void* dhL, void* dx, void* partial, void* dh0, void* mf, void* sqf, void* ws,
                       cudaStream_t st) {
  if (h0 != nullptr) return backward_g<XT, AT, true>(p, x, dy, coef, h0, dhL, dx, partial, dh0, mf, sqf, ws, st);
  return backward_g<XT, AT, false>(p, x, dy, coef, h0, dhL, dx, partial, dh0, mf, sqf, ws, st);
}

}  // namespace

int64_t chunk_length(int64_t B, int64_t L, int64_t D, bool backward) {
  if (L <= 0) return 1;
  const int64_t target = backward ? 32768 : 131072;  // (batch x chunk x channel) threads
  const int64_t rows = B * D > 0 ? B * D : 1;
  int64_t nc = (target + rows - 1) / rows;
  const int64_t max_nc = (L + 31) / 32;  // chunks of at least 32 steps
  if (nc > max_nc) nc = max_nc;
  if (nc < 1) nc = 1;
  return (L + nc - 1) / nc;
}

int64_t forward_workspace(const Problem& p) { return p.B * p.dirs * p.nchunks * p.N * p.D; }

int64_t backward_workspace(const Problem& p, bool has_h0) {
  return p.B * p.dirs * p.nchunks * p.N * p.D * (has_h0 ? 4 : 3);
}

int64_t backward_partial(const Problem& p) { return p.B * p.nchunks * 3 * p.dirs * p.N * p.D; }

cudaError_t forward(const Problem& p, DType xt, const void* x, const void* coef, const void* h0, void* y,
                    void* hL, void* workspace, cudaStream_t stream) {
  switch (xt) {
    case DType::kHalf: return forward_g<__half, float>(p, x, coef, h0, y, hL, workspace, stream);
    case DType::kBFloat16: return forward_g<__nv_bfloat16, float>(p, x, coef, h0, y, hL, workspace, stream);
    case DType::kFloat: return forward_g<float, float>(p, x, coef, h0, y, hL, workspace, stream);
    case DType::kDouble: return forward_g<double, double>(p, x, coef, h0, y, hL, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(const Problem& p, DType xt, const void* x, const void* dy, const void* coef, const void* h0,
                     const void* dhL, void* dx, void* partial, void* dh0, void* m_final, void* sq_final,
                     void* workspace, cudaStream_t stream) {
  switch (xt) {
    case DType::kHalf:
      return backward_h<__half, float>(p, x, dy, coef, h0, dhL, dx, partial, dh0, m_final, sq_final, workspace, stream);
    case DType::kBFloat16:
      return backward_h<__nv_bfloat16, float>(p, x, dy, coef, h0, dhL, dx, partial, dh0, m_final, sq_final, workspace,
                                              stream);
    case DType::kFloat:
      return backward_h<float, float>(p, x, dy, coef, h0, dhL, dx, partial, dh0, m_final, sq_final, workspace, stream);
    case DType::kDouble:
      return backward_h<double, double>(p, x, dy, coef, h0, dhL, dx, partial, dh0, m_final, sq_final, workspace,
                                        stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t step(int64_t B, int64_t D, int64_t N, DType xt, const void* x, const void* h0, const void* pb,
                 const void* q, const void* g, void* y, void* h1, cudaStream_t stream) {
  const unsigned int grid = blocks_for(B * D);
#define MEGATRON_EXT_EMA_STEP(XT, AT)                                                                        \
  step_kernel<XT, AT><<<grid, kThreads, 0, stream>>>(B, D, N, static_cast<const XT*>(x),                     \
                                                     static_cast<const AT*>(h0), static_cast<const AT*>(pb), \
                                                     static_cast<const AT*>(q), static_cast<const AT*>(g),   \
                                                     static_cast<AT*>(y), static_cast<AT*>(h1))
  switch (xt) {
    case DType::kHalf: MEGATRON_EXT_EMA_STEP(__half, float); break;
    case DType::kBFloat16: MEGATRON_EXT_EMA_STEP(__nv_bfloat16, float); break;
    case DType::kFloat: MEGATRON_EXT_EMA_STEP(float, float); break;
    case DType::kDouble: MEGATRON_EXT_EMA_STEP(double, double); break;
    default: return cudaErrorInvalidValue;
  }
#undef MEGATRON_EXT_EMA_STEP
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace megatron_ext_ema

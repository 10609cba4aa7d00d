// Vectorized CPU kernels of the multi-dimensional damped EMA: the body of one instruction-set
// variant.  Included (once) by ema_cpu_avx512.cpp / ema_cpu_avx2.cpp / ema_cpu_generic.cpp, which
// define before including it:
//   EMA_NS      namespace of the variant (avx512, avx2, generic)
//   EMA_VBYTES  vector width in bytes (64, 32, 16)
//   EMA_GFWD    largest lane group of the forward scan          (lanes held in registers)
//   EMA_GREV    largest lane group of the reverse (adjoint) scan
//   EMA_GGRAD   largest lane group of the parameter-gradient scan
// and, for the x86 variants, a `#pragma GCC target(...)` around the include.  Everything below
// lives in EMA_NS (no std:: templates are instantiated here, so no inline function compiled for a
// wider instruction set can be picked by the linker for the baseline code).
//
// Algorithm (no torch, T = float or double, all arithmetic in T):
//
// * The SIMD vector runs across W = EMA_VBYTES / sizeof(T) adjacent channels (the channels-last
//   layout makes x_s[d0 .. d0+W) one contiguous load); a lane group of G EMA lanes is held in G
//   vector registers.  One work item = (batch b, channel block d0); OpenMP runs over the
//   B * Dp / W items.  Per step and lane: forward 3 flops (q*h, +pb*x, +g*h), so about 2N FMAs per
//   output element, no transcendental functions, and nothing is stored beyond y.
//
// * Backward: with lambda_s = dLoss/dh_s,
//       lambda_s = g * dy_s + q * lambda_{s+1},  lambda_{L-1} = g * dy_{L-1} + dhL
//       dx_s     = sum_n pb * lambda_s,          dh0 = q * lambda_0
//   is one reverse scan (the "adjoint" EMA of dy).  The parameter gradients
//       dg = sum_s dy_s h_s,  dpb = sum_s lambda_s x_s,  dq = sum_s lambda_s h_{s-1}
//   are computed instead by forward-mode sensitivities, which need no stored or reversed states
//   (no checkpoints, no division by q): m_s = dh_s/dpb and sq_s = dh_s/dq follow
//       m_s  = q * m_{s-1} + x_s                       (m_{-1} = 0)
//       sq_s = q * sq_{s-1} + h_{s-1}                  (sq_{-1} = 0)
//   and dpb = sum_s g dy_s m_s + dhL m_{L-1},  dq = sum_s g dy_s sq_s + dhL sq_{L-1}.
//   Without h0, h_s = pb * m_s, so only (m, sq/pb) need scanning: 4 flops per step and lane;
//   with h0 the scan carries (h, sq, m): 7 flops.
//
// Both recurrences have |q| < 1: rounding errors stay bounded (unlike q^-k closed forms).

namespace megatron_ext_ema {
namespace EMA_NS {
namespace {

template <typename T>
struct VecT {
  typedef T type __attribute__((vector_size(EMA_VBYTES)));
  static constexpr int W = EMA_VBYTES / static_cast<int>(sizeof(T));
};

template <typename V, typename T>
inline V vld(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void vst(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Flush denormals to zero (FTZ + DAZ) for the guard's lifetime on this thread.  A state that decays
// through a run of zero inputs (padding) spends many steps in the denormal range, where x86 FP
// arithmetic takes microcode assists (a 20x slowdown measured on a zero-padded tail); values below
// ~1e-38 (1e-308 in double) do not matter here.  Set inside every OpenMP work item (per thread).
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved;
  FlushDenormals() : saved(__builtin_ia32_stmxcsr()) { __builtin_ia32_ldmxcsr(saved | 0x8040u); }
  ~FlushDenormals() { __builtin_ia32_ldmxcsr(saved); }
#elif defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__)
  unsigned long long saved;
  FlushDenormals() : saved(__builtin_aarch64_get_fpcr64()) { __builtin_aarch64_set_fpcr64(saved | (1ull << 24)); }
  ~FlushDenormals() { __builtin_aarch64_set_fpcr64(saved); }
#endif
};

constexpr int64_t kPrefetch = 12;  // steps ahead: consecutive steps are Dp elements apart

// Coefficients of one (direction, lane group, channel block) as vectors over the W channels;
// lanes >= N get zero coefficients (their state stays 0 and adds nothing).
template <typename T, int G>
struct Coefs {
  using V = typename VecT<T>::type;
  V pb[G], q[G], g[G];
};

template <typename T, int G>
inline void load_coefs(Coefs<T, G>& c, const T* coef, const CpuProblem& p, int dir, int64_t n0, int64_t d0) {
  using V = typename VecT<T>::type;
  const int64_t plane = static_cast<int64_t>(p.dirs) * p.N * p.Dp;
  for (int n = 0; n < G; ++n) {
    if (n0 + n < p.N) {
      const int64_t off = (static_cast<int64_t>(dir) * p.N + n0 + n) * p.Dp + d0;
      c.pb[n] = vld<V>(coef + off);
      c.q[n] = vld<V>(coef + plane + off);
      c.g[n] = vld<V>(coef + 2 * plane + off);
    } else {
      c.pb[n] = V{};
      c.q[n] = V{};
      c.g[n] = V{};
    }
  }
}

// [B, D, N] state <-> G vectors over the channel block (channels >= D / lanes >= N: zero / skipped).
template <typename T, int G>
inline void gather_state(typename VecT<T>::type* out, const T* src, const CpuProblem& p, int64_t b,
                         int64_t d0, int64_t n0) {
  using V = typename VecT<T>::type;
  constexpr int W = VecT<T>::W;
  for (int n = 0; n < G; ++n) out[n] = V{};
  if (src == nullptr) return;
  for (int w = 0; w < W && d0 + w < p.D; ++w)
    for (int n = 0; n < G && n0 + n < p.N; ++n) out[n][w] = src[(b * p.D + d0 + w) * p.N + n0 + n];
}

template <typename T, int G>
inline void scatter_state(T* dst, const typename VecT<T>::type* in, const CpuProblem& p, int64_t b,
                          int64_t d0, int64_t n0) {
  constexpr int W = VecT<T>::W;
  for (int w = 0; w < W && d0 + w < p.D; ++w)
    for (int n = 0; n < G && n0 + n < p.N; ++n) dst[(b * p.D + d0 + w) * p.N + n0 + n] = in[n][w];
}

// Work decomposition: one OpenMP work item = (batch b, a run of up to kBlocksPerItem channel
// blocks of W channels).  Within an item the sequence is walked in tiles of kTile steps, and every
// tile visits all blocks (and lane groups) of the item, carrying their states in a small buffer:
// consecutive steps are Dp elements apart, so walking one block through the whole sequence would
// touch a new page per step (TLB misses); a tile keeps the pages of kTile rows hot for all blocks.
constexpr int64_t kTile = 128;
constexpr int64_t kBlocksPerItem = 16;

inline int64_t blocks_per_item(const CpuProblem& p, int64_t nblk) {
  // enough items for load balance (>= 4 per thread when possible), at most kBlocksPerItem blocks each
  int64_t per = (p.B * nblk + 4 * p.nthreads - 1) / (4 * p.nthreads);
  if (per > kBlocksPerItem) per = kBlocksPerItem;
  if (per < 1) per = 1;
  return per;
}

template <typename T>
struct Item {
  int64_t b, blk0, nb;  // batch, first block, number of blocks (only blocks with channels < D)
};

template <typename T>
inline Item<T> item_of(const CpuProblem& p, int64_t it, int64_t nblk, int64_t per) {
  constexpr int W = VecT<T>::W;
  const int64_t ngrp = (nblk + per - 1) / per;
  Item<T> r;
  r.b = it / ngrp;
  r.blk0 = (it % ngrp) * per;
  const int64_t real_blocks = (p.D + W - 1) / W;  // blocks made only of channel padding are skipped
  const int64_t end = imin(imin(r.blk0 + per, nblk), real_blocks);
  r.nb = end > r.blk0 ? end - r.blk0 : 0;
  return r;
}

template <typename T>
inline typename VecT<T>::type* alloc_vecs(int64_t count) {
  using V = typename VecT<T>::type;
  void* ptr = nullptr;
  if (posix_memalign(&ptr, 64, static_cast<size_t>(count > 0 ? count : 1) * sizeof(V)) != 0) return nullptr;
  return static_cast<V*>(ptr);
}

// ------------------------------------------------------------------------------------ forward
// h <- scan over `len` steps; y (+)= sum_n g h.  xp / yp point at the first step, `stride`
// elements per step.
template <typename T, int G, bool ACC>
inline void fwd_run(const T* __restrict xp, T* __restrict yp, int64_t stride, int64_t len,
                    const Coefs<T, G>& c, typename VecT<T>::type* h) {
  using V = typename VecT<T>::type;
  V hh[G];
  for (int n = 0; n < G; ++n) hh[n] = h[n];
  for (int64_t s = 0; s < len; ++s) {
    const T* xs = xp + s * stride;
    T* ys = yp + s * stride;
    if (s + kPrefetch < len) {
      __builtin_prefetch(xs + kPrefetch * stride, 0, 3);
      __builtin_prefetch(ys + kPrefetch * stride, 1, 3);
    }
    const V xv = vld<V>(xs);
    V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
#pragma GCC unroll 16
    for (int n = 0; n < G; n += 4) {
      hh[n] = c.q[n] * hh[n] + c.pb[n] * xv;
      hh[n + 1] = c.q[n + 1] * hh[n + 1] + c.pb[n + 1] * xv;
      hh[n + 2] = c.q[n + 2] * hh[n + 2] + c.pb[n + 2] * xv;
      hh[n + 3] = c.q[n + 3] * hh[n + 3] + c.pb[n + 3] * xv;
      a0 += c.g[n] * hh[n];
      a1 += c.g[n + 1] * hh[n + 1];
      a2 += c.g[n + 2] * hh[n + 2];
      a3 += c.g[n + 3] * hh[n + 3];
    }
    V acc = (a0 + a1) + (a2 + a3);
    if (ACC) acc += vld<V>(ys);
    vst(ys, acc);
  }
  for (int n = 0; n < G; ++n) h[n] = hh[n];
}

template <typename T, int G>
bool forward_items(const CpuProblem& p, const CpuFwdArgs<T>& a) {
  using V = typename VecT<T>::type;
  constexpr int W = VecT<T>::W;
  const int64_t nblk = p.Dp / W;
  const int64_t per = blocks_per_item(p, nblk);
  const int64_t items = p.B * ((nblk + per - 1) / per);
  const int64_t nlg = (p.N + G - 1) / G;  // lane groups
  const int64_t ntiles = (p.L + kTile - 1) / kTile;
  int failed = 0;
#pragma omp parallel for schedule(static) num_threads(p.nthreads) if (p.nthreads > 1 && items > 1) reduction(| : failed)
  for (int64_t it = 0; it < items; ++it) {
    const Item<T> item = item_of<T>(p, it, nblk, per);
    if (item.nb == 0) continue;
    FlushDenormals ftz;
    V* states = alloc_vecs<T>(item.nb * nlg * G);
    if (states == nullptr) {
      failed = 1;
      continue;
    }
    for (int dir = 0; dir < p.dirs; ++dir) {
      const int64_t stride = dir == 0 ? p.Dp : -p.Dp;
      for (int64_t k = 0; k < item.nb; ++k)
        for (int64_t lg = 0; lg < nlg; ++lg)
          gather_state<T, G>(states + (k * nlg + lg) * G, dir == 0 ? a.h0 : nullptr, p, item.b,
                             (item.blk0 + k) * W, lg * G);
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t s0 = tile * kTile, len = imin(kTile, p.L - s0);
        const int64_t t0 = dir == 0 ? s0 : p.L - 1 - s0;  // time of the tile's first step
        for (int64_t k = 0; k < item.nb; ++k) {
          const int64_t d0 = (item.blk0 + k) * W;
          const int64_t off = (item.b * p.L + t0) * p.Dp + d0;
          for (int64_t lg = 0; lg < nlg; ++lg) {
            Coefs<T, G> c;
            load_coefs<T, G>(c, a.coef, p, dir, lg * G, d0);
            V* h = states + (k * nlg + lg) * G;
            if (dir == 0 && lg == 0)
              fwd_run<T, G, false>(a.x + off, a.y + off, stride, len, c, h);
            else
              fwd_run<T, G, true>(a.x + off, a.y + off, stride, len, c, h);
          }
        }
      }
      if (dir == 0 && a.hL != nullptr)
        for (int64_t k = 0; k < item.nb; ++k)
          for (int64_t lg = 0; lg < nlg; ++lg)
            scatter_state<T, G>(a.hL, states + (k * nlg + lg) * G, p, item.b, (item.blk0 + k) * W, lg * G);
    }
    free(states);
  }
  return failed == 0;  // false: a state buffer could not be allocated
}

// ----------------------------------------------------------------------------------- backward
// Adjoint scan over `len` steps in reverse processing order (dyp / dxp point at the tile's LAST
// processing step, `stride` per processing step): with the carry cr = q * lambda_{s+1} (dhL at the
// end of the sequence), lambda_s = g dy_s + cr; dx_s (+)= sum_n pb lambda_s; cr = q lambda_s.
template <typename T, int G, bool ACC>
inline void rev_run(const T* __restrict dyp, T* __restrict dxp, int64_t stride, int64_t len,
                    const Coefs<T, G>& c, typename VecT<T>::type* cr) {
  using V = typename VecT<T>::type;
  V cc[G];
  for (int n = 0; n < G; ++n) cc[n] = cr[n];
  for (int64_t s = 0; s < len; ++s) {
    const T* dys = dyp - s * stride;
    T* dxs = dxp - s * stride;
    if (s + kPrefetch < len) {
      __builtin_prefetch(dys - kPrefetch * stride, 0, 3);
      __builtin_prefetch(dxs - kPrefetch * stride, 1, 3);
    }
    const V dyv = vld<V>(dys);
    V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
#pragma GCC unroll 16
    for (int n = 0; n < G; n += 4) {
      const V l0 = c.g[n] * dyv + cc[n];
      const V l1 = c.g[n + 1] * dyv + cc[n + 1];
      const V l2 = c.g[n + 2] * dyv + cc[n + 2];
      const V l3 = c.g[n + 3] * dyv + cc[n + 3];
      a0 += c.pb[n] * l0;
      a1 += c.pb[n + 1] * l1;
      a2 += c.pb[n + 2] * l2;
      a3 += c.pb[n + 3] * l3;
      cc[n] = c.q[n] * l0;
      cc[n + 1] = c.q[n + 1] * l1;
      cc[n + 2] = c.q[n + 2] * l2;
      cc[n + 3] = c.q[n + 3] * l3;
    }
    V acc = (a0 + a1) + (a2 + a3);
    if (ACC) acc += vld<V>(dxs);
    vst(dxs, acc);
  }
  for (int n = 0; n < G; ++n) cr[n] = cc[n];
}

// State of the sensitivity scan of one lane group (see the file header): scans m, sq (and h when
// h0 is given) and accumulates P = sum dy m, Q = sum dy sq (and Gs = sum dy h).
template <typename T, int G>
struct GradState {
  using V = typename VecT<T>::type;
  V m[G], sq[G], h[G], P[G], Q[G], Gs[G];
};

template <typename T, int G, bool H0>
inline void grad_run(const T* __restrict xp, const T* __restrict dyp, int64_t stride, int64_t len,
                     const Coefs<T, G>& c, GradState<T, G>& st) {
  using V = typename VecT<T>::type;
  V m[G], sq[G], h[G], P[G], Q[G], Gs[G];
  for (int n = 0; n < G; ++n) {
    m[n] = st.m[n];
    sq[n] = st.sq[n];
    P[n] = st.P[n];
    Q[n] = st.Q[n];
    if (H0) {
      h[n] = st.h[n];
      Gs[n] = st.Gs[n];
    }
  }
  for (int64_t s = 0; s < len; ++s) {
    const T* xs = xp + s * stride;
    const T* dys = dyp + s * stride;
    if (s + kPrefetch < len) {
      __builtin_prefetch(xs + kPrefetch * stride, 0, 3);
      __builtin_prefetch(dys + kPrefetch * stride, 0, 3);
    }
    const V xv = vld<V>(xs);
    const V dyv = vld<V>(dys);
    if (H0) {
#pragma GCC unroll 16
      for (int n = 0; n < G; ++n) {
        sq[n] = c.q[n] * sq[n] + h[n];
        h[n] = c.q[n] * h[n] + c.pb[n] * xv;
        m[n] = c.q[n] * m[n] + xv;
        Gs[n] += dyv * h[n];
        P[n] += dyv * m[n];
        Q[n] += dyv * sq[n];
      }
    } else {
      // h = pb * m: scan m and sq / pb.
#pragma GCC unroll 16
      for (int n = 0; n < G; ++n) {
        sq[n] = c.q[n] * sq[n] + m[n];
        m[n] = c.q[n] * m[n] + xv;
        P[n] += dyv * m[n];
        Q[n] += dyv * sq[n];
      }
    }
  }
  for (int n = 0; n < G; ++n) {
    st.m[n] = m[n];
    st.sq[n] = sq[n];
    st.P[n] = P[n];
    st.Q[n] = Q[n];
    if (H0) {
      st.h[n] = h[n];
      st.Gs[n] = Gs[n];
    }
  }
}

// Parameter gradients of one lane group from its final sensitivity state; dhLv = gradient of the
// final state (zeros if none).
template <typename T, int G, bool H0>
inline void grad_finish(const Coefs<T, G>& c, const GradState<T, G>& st, const typename VecT<T>::type* dhLv,
                        typename VecT<T>::type* dpb, typename VecT<T>::type* dq, typename VecT<T>::type* dg) {
  for (int n = 0; n < G; ++n) {
    if (H0) {
      dg[n] = st.Gs[n];
      dpb[n] = c.g[n] * st.P[n] + dhLv[n] * st.m[n];
      dq[n] = c.g[n] * st.Q[n] + dhLv[n] * st.sq[n];
    } else {
      dg[n] = c.pb[n] * st.P[n];
      dpb[n] = c.g[n] * st.P[n] + dhLv[n] * st.m[n];
      dq[n] = c.pb[n] * (c.g[n] * st.Q[n] + dhLv[n] * st.sq[n]);
    }
  }
}

template <typename T, int GR, int GG, bool H0>
bool backward_items_h(const CpuProblem& p, const CpuBwdArgs<T>& a) {
  using V = typename VecT<T>::type;
  constexpr int W = VecT<T>::W;
  const int64_t nblk = p.Dp / W;
  const int64_t per = blocks_per_item(p, nblk);
  const int64_t items = p.B * ((nblk + per - 1) / per);
  const int64_t nlr = (p.N + GR - 1) / GR, nlg = (p.N + GG - 1) / GG;
  const int64_t ntiles = (p.L + kTile - 1) / kTile;
  const int64_t cplane = static_cast<int64_t>(p.dirs) * p.N * p.Dp;  // one of pb / q / g
  int failed = 0;
#pragma omp parallel for schedule(static) num_threads(p.nthreads) if (p.nthreads > 1 && items > 1) reduction(| : failed)
  for (int64_t it = 0; it < items; ++it) {
    const Item<T> item = item_of<T>(p, it, nblk, per);
    if (item.nb == 0) continue;
    FlushDenormals ftz;
    V* carries = alloc_vecs<T>(item.nb * nlr * GR);
    GradState<T, GG>* gs = static_cast<GradState<T, GG>*>(
        static_cast<void*>(alloc_vecs<T>(item.nb * nlg * static_cast<int64_t>(sizeof(GradState<T, GG>) / sizeof(V)))));
    if (carries == nullptr || gs == nullptr) {
      failed = 1;
      free(carries);
      free(gs);
      continue;
    }
    T* dcoef = a.dcoef + item.b * 3 * cplane;
    for (int dir = 0; dir < p.dirs; ++dir) {
      const int64_t stride = dir == 0 ? p.Dp : -p.Dp;
      const bool with_state = dir == 0;  // h0 / dhL / dh0 belong to direction 0
      // 1) adjoint scan, tiles in reverse processing order -> dx, dh0
      for (int64_t k = 0; k < item.nb; ++k)
        for (int64_t lg = 0; lg < nlr; ++lg)
          gather_state<T, GR>(carries + (k * nlr + lg) * GR, with_state ? a.dhL : nullptr, p, item.b,
                              (item.blk0 + k) * W, lg * GR);
      for (int64_t tile = ntiles - 1; tile >= 0; --tile) {
        const int64_t s0 = tile * kTile, len = imin(kTile, p.L - s0);
        const int64_t s_last = s0 + len - 1;
        const int64_t t_last = dir == 0 ? s_last : p.L - 1 - s_last;  // time of the tile's last step
        for (int64_t k = 0; k < item.nb; ++k) {
          const int64_t d0 = (item.blk0 + k) * W;
          const int64_t off = (item.b * p.L + t_last) * p.Dp + d0;
          for (int64_t lg = 0; lg < nlr; ++lg) {
            Coefs<T, GR> c;
            load_coefs<T, GR>(c, a.coef, p, dir, lg * GR, d0);
            V* cr = carries + (k * nlr + lg) * GR;
            if (dir == 0 && lg == 0)
              rev_run<T, GR, false>(a.dy + off, a.dx + off, stride, len, c, cr);
            else
              rev_run<T, GR, true>(a.dy + off, a.dx + off, stride, len, c, cr);
          }
        }
      }
      if (with_state && a.dh0 != nullptr)
        for (int64_t k = 0; k < item.nb; ++k)
          for (int64_t lg = 0; lg < nlr; ++lg)
            scatter_state<T, GR>(a.dh0, carries + (k * nlr + lg) * GR, p, item.b, (item.blk0 + k) * W, lg * GR);
      // 2) sensitivity scan, tiles in processing order -> per-batch dpb, dq, dg
      const bool h0_here = H0 && with_state;
      for (int64_t k = 0; k < item.nb; ++k) {
        for (int64_t lg = 0; lg < nlg; ++lg) {
          GradState<T, GG>& st = gs[k * nlg + lg];
          for (int n = 0; n < GG; ++n) {
            st.m[n] = V{};
            st.sq[n] = V{};
            st.P[n] = V{};
            st.Q[n] = V{};
            st.Gs[n] = V{};
          }
          gather_state<T, GG>(st.h, h0_here ? a.h0 : nullptr, p, item.b, (item.blk0 + k) * W, lg * GG);
        }
      }
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t s0 = tile * kTile, len = imin(kTile, p.L - s0);
        const int64_t t0 = dir == 0 ? s0 : p.L - 1 - s0;
        for (int64_t k = 0; k < item.nb; ++k) {
          const int64_t d0 = (item.blk0 + k) * W;
          const int64_t off = (item.b * p.L + t0) * p.Dp + d0;
          for (int64_t lg = 0; lg < nlg; ++lg) {
            Coefs<T, GG> c;
            load_coefs<T, GG>(c, a.coef, p, dir, lg * GG, d0);
            if (h0_here)
              grad_run<T, GG, true>(a.x + off, a.dy + off, stride, len, c, gs[k * nlg + lg]);
            else
              grad_run<T, GG, false>(a.x + off, a.dy + off, stride, len, c, gs[k * nlg + lg]);
          }
        }
      }
      for (int64_t k = 0; k < item.nb; ++k) {
        const int64_t d0 = (item.blk0 + k) * W;
        for (int64_t lg = 0; lg < nlg; ++lg) {
          const int64_t n0 = lg * GG;
          Coefs<T, GG> c;
          load_coefs<T, GG>(c, a.coef, p, dir, n0, d0);
          V dhLv[GG], dpb[GG], dq[GG], dg[GG];
          gather_state<T, GG>(dhLv, with_state ? a.dhL : nullptr, p, item.b, d0, n0);
          if (h0_here)
            grad_finish<T, GG, true>(c, gs[k * nlg + lg], dhLv, dpb, dq, dg);
          else
            grad_finish<T, GG, false>(c, gs[k * nlg + lg], dhLv, dpb, dq, dg);
          for (int n = 0; n < GG && n0 + n < p.N; ++n) {
            const int64_t off = (static_cast<int64_t>(dir) * p.N + n0 + n) * p.Dp + d0;
            vst(dcoef + off, dpb[n]);
            vst(dcoef + cplane + off, dq[n]);
            vst(dcoef + 2 * cplane + off, dg[n]);
          }
        }
      }
    }
    free(carries);
    free(gs);
  }
  return failed == 0;
}

template <typename T, int GR, int GG>
bool backward_items(const CpuProblem& p, const CpuBwdArgs<T>& a) {
  if (a.h0 != nullptr) return backward_items_h<T, GR, GG, true>(p, a);
  return backward_items_h<T, GR, GG, false>(p, a);
}

// Smallest lane group (of 4, 8, 16 up to GMAX) that holds N, else GMAX (several groups).
template <int GMAX>
inline int pick_group(int64_t N) {
  if (N <= 4 || GMAX <= 4) return 4;
  if (N <= 8 || GMAX <= 8) return 8;
  return 16;
}

template <typename T>
bool forward_t(const CpuProblem& p, const CpuFwdArgs<T>& a) {
  const int g = pick_group<EMA_GFWD>(p.N);
#if EMA_GFWD >= 16
  if (g == 16) return forward_items<T, 16>(p, a);
#endif
#if EMA_GFWD >= 8
  if (g == 8) return forward_items<T, 8>(p, a);
#endif
  return forward_items<T, 4>(p, a);
}

static_assert(EMA_GGRAD <= EMA_GREV, "the gradient lane group must not exceed the reverse-scan group");

template <typename T>
bool backward_t(const CpuProblem& p, const CpuBwdArgs<T>& a) {
  const int gr = pick_group<EMA_GREV>(p.N);
  const int gg = pick_group<EMA_GGRAD>(p.N);
#if EMA_GREV >= 16
  if (gr == 16) return gg == 4 ? backward_items<T, 16, 4>(p, a) : backward_items<T, 16, EMA_GGRAD>(p, a);
#endif
#if EMA_GREV >= 8
  if (gr == 8) return gg == 4 ? backward_items<T, 8, 4>(p, a) : backward_items<T, 8, EMA_GGRAD>(p, a);
#endif
  return backward_items<T, 4, 4>(p, a);
}

}  // namespace

bool compiled() { return true; }
bool forward(const CpuProblem& p, const CpuFwdArgs<float>& a) { return forward_t<float>(p, a); }
bool forward(const CpuProblem& p, const CpuFwdArgs<double>& a) { return forward_t<double>(p, a); }
bool backward(const CpuProblem& p, const CpuBwdArgs<float>& a) { return backward_t<float>(p, a); }
bool backward(const CpuProblem& p, const CpuBwdArgs<double>& a) { return backward_t<double>(p, a); }

}  // namespace EMA_NS
}  // namespace megatron_ext_ema

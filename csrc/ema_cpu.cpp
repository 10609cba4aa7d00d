// Torch binding of the CPU EMA kernels: defines the `megatron_ext_ema` operator library
// (torch.ops.megatron_ext_ema.*) and registers its CPU implementations.  The CUDA
// implementations of the same operators live in ema_cuda.cpp (a separate library, built only when
// torch has CUDA).  Python side: megatron_ext/kernels/ema.py (validation + autograd Function).
//
// Operators (x is [B, D, L] of any strides; pb, q, g are [kd, N] with kd = D, or 2D when
// bidirectional, all float32 or all float64; float16 / bfloat16 x is accepted with float32
// coefficients and computed in float32):
//   ema_fwd(x, pb, q, g, h0?, bidirectional, return_state) -> (y [B, D, L], h_last [B, D, N] | [0])
//   ema_bwd(dy, x, pb, q, g, h0?, dh_last?, bidirectional, need_dh0)
//       -> (dx [B, D, L] in x's dtype, dpb, dq, dg [kd, N], dh0 [B, D, N] | [0])
//   ema_step(x [B, D], h0? [B, D, N], pb, q, g [D, N]) -> (y [B, D], h1 [B, D, N])
//   cpu_isa() -> str   the kernel variant the CPU operators use ("avx512", "avx2", "generic")
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "ema_cpu_kernel.h"

namespace megatron_ext_ema {
namespace {

using at::Tensor;

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (avx512::compiled() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512;
  if (avx2::compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

// MEGATRON_EXT_EMA_CPU_ISA=generic|avx2|avx512 caps the variant (read on every call; a variant the
// CPU lacks is never used).
Isa current_isa() {
  static const Isa best = best_isa();
  const char* env = std::getenv("MEGATRON_EXT_EMA_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want = best;
  if (std::strcmp(env, "generic") == 0) want = Isa::kGeneric;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  else TORCH_CHECK(false, "MEGATRON_EXT_EMA_CPU_ISA must be auto, generic, avx2 or avx512, got '", env, "'");
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

std::string cpu_isa() {
  switch (current_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

int num_threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

// ------------------------------------------------------------------------------ validation
void check_coefs(const Tensor& x, const Tensor& pb, const Tensor& q, const Tensor& g, bool bidirectional) {
  TORCH_CHECK(x.dim() == 3, "ema: expected x of shape [batch, channels, length], got ", x.sizes());
  const int64_t kd = (bidirectional ? 2 : 1) * x.size(1);
  for (const Tensor* t : {&pb, &q, &g}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == kd && t->size(1) == pb.size(1),
                "ema: expected pb, q, g of shape [", kd, ", N] (kd = ", bidirectional ? "2 * " : "",
                "channels), got ", pb.sizes(), ", ", q.sizes(), ", ", g.sizes());
    TORCH_CHECK(t->scalar_type() == pb.scalar_type(), "ema: pb, q, g must share one dtype");
    TORCH_CHECK(t->device() == x.device(), "ema: pb, q, g must be on x's device");
  }
  TORCH_CHECK(pb.size(1) >= 1, "ema: expected N >= 1");
  const auto ct = pb.scalar_type();
  TORCH_CHECK(ct == at::kFloat || ct == at::kDouble, "ema: coefficients must be float32 or float64, got ", ct);
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kHalf || xt == at::kBFloat16,
              "ema: x must be float16, bfloat16, float32 or float64, got ", xt);
  TORCH_CHECK((xt == at::kDouble) == (ct == at::kDouble),
              "ema: float64 x needs float64 coefficients and vice versa (x ", xt, ", coefficients ", ct, ")");
}

void check_state(const std::optional<Tensor>& s, const Tensor& x, int64_t N, const char* name) {
  if (!s.has_value() || !s->defined()) return;
  TORCH_CHECK(s->dim() == 3 && s->size(0) == x.size(0) && s->size(1) == x.size(1) && s->size(2) == N,
              "ema: expected ", name, " of shape [", x.size(0), ", ", x.size(1), ", ", N, "], got ", s->sizes());
  TORCH_CHECK(s->device() == x.device(), "ema: ", name, " must be on x's device");
  TORCH_CHECK(s->is_floating_point(), "ema: ", name, " must be floating point");
}

// ---------------------------------------------------------------------------------- layout
int64_t padded_channels(int64_t D, at::ScalarType t) {
  const int64_t pad = t == at::kDouble ? channel_pad<double>() : channel_pad<float>();
  return (D + pad - 1) / pad * pad;
}

// [B, D, L] (any strides) -> [B, L, Dp] contiguous in dtype t (no copy when already so).
Tensor channels_last(const Tensor& x, at::ScalarType t, int64_t Dp) {
  Tensor v = x.to(t).transpose(1, 2);
  if (Dp != v.size(2)) return at::constant_pad_nd(v, {0, Dp - v.size(2)}, 0);
  return v.contiguous();
}

// pb, q, g [dirs * D, N] -> [3, dirs, N, Dp] contiguous, zero for padded channels.
Tensor pack_coefs(const Tensor& pb, const Tensor& q, const Tensor& g, int dirs, int64_t D, int64_t Dp) {
  const int64_t N = pb.size(1);
  Tensor c = at::stack({pb, q, g}).view({3, dirs, D, N}).transpose(2, 3);
  if (Dp != D) return at::constant_pad_nd(c, {0, Dp - D}, 0);
  return c.contiguous();
}

Tensor opt_state(const std::optional<Tensor>& s, at::ScalarType t) {
  if (!s.has_value() || !s->defined()) return Tensor();
  return s->to(t).contiguous();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

CpuProblem make_problem(int64_t B, int64_t L, int64_t D, int64_t Dp, int64_t N, int dirs) {
  CpuProblem p{};
  p.B = B;
  p.L = L;
  p.D = D;
  p.Dp = Dp;
  p.N = N;
  p.dirs = dirs;
  p.nthreads = num_threads();
  return p;
}

template <typename T>
void run_forward(const CpuProblem& p, const CpuFwdArgs<T>& a) {
  bool ok = false;
  switch (current_isa()) {
    case Isa::kAvx512: ok = avx512::forward(p, a); break;
    case Isa::kAvx2: ok = avx2::forward(p, a); break;
    default: ok = generic::forward(p, a); break;
  }
  TORCH_CHECK(ok, "ema (CPU) forward: out of memory for the per-thread state buffers");
}

template <typename T>
void run_backward(const CpuProblem& p, const CpuBwdArgs<T>& a) {
  bool ok = false;
  switch (current_isa()) {
    case Isa::kAvx512: ok = avx512::backward(p, a); break;
    case Isa::kAvx2: ok = avx2::backward(p, a); break;
    default: ok = generic::backward(p, a); break;
  }
  TORCH_CHECK(ok, "ema (CPU) backward: out of memory for the per-thread state buffers");
}

// -------------------------------------------------------------------------------- operators
std::tuple<Tensor, Tensor> ema_fwd_cpu(const Tensor& x, const Tensor& pb, const Tensor& q, const Tensor& g,
                                       const std::optional<Tensor>& h0, bool bidirectional, bool return_state) {
  check_coefs(x, pb, q, g, bidirectional);
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), N = pb.size(1);
  const bool has_h0 = h0.has_value() && h0->defined();
  TORCH_CHECK(!bidirectional || (!has_h0 && !return_state), "ema: a bidirectional EMA carries no state");
  check_state(h0, x, N, "h0");
  const auto t = pb.scalar_type();
  const int dirs = bidirectional ? 2 : 1;
  const int64_t Dp = padded_channels(D, t);
  const auto opts = x.options().dtype(t);
  Tensor xl = channels_last(x, t, Dp);
  Tensor coef = pack_coefs(pb, q, g, dirs, D, Dp);
  Tensor h0c = opt_state(h0, t);
  Tensor y = at::empty({B, L, Dp}, opts);
  Tensor hL = return_state ? at::empty({B, D, N}, opts) : at::empty({0}, opts);
  if (L == 0) {
    if (return_state) hL = has_h0 ? h0c.clone() : at::zeros({B, D, N}, opts);
  } else if (B > 0 && D > 0) {
    const CpuProblem p = make_problem(B, L, D, Dp, N, dirs);
    AT_DISPATCH_FLOATING_TYPES(t, "ema_fwd_cpu", [&] {
      CpuFwdArgs<scalar_t> a{};
      a.x = xl.data_ptr<scalar_t>();
      a.coef = coef.data_ptr<scalar_t>();
      a.h0 = ptr_or_null<scalar_t>(h0c);
      a.y = y.data_ptr<scalar_t>();
      a.hL = return_state ? hL.data_ptr<scalar_t>() : nullptr;
      run_forward<scalar_t>(p, a);
    });
  }
  if (Dp != D) y = y.narrow(2, 0, D);
  return std::make_tuple(y.transpose(1, 2), hL);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ema_bwd_cpu(
    const Tensor& dy, const Tensor& x, const Tensor& pb, const Tensor& q, const Tensor& g,
    const std::optional<Tensor>& h0, const std::optional<Tensor>& dh_last, bool bidirectional, bool need_dh0) {
  check_coefs(x, pb, q, g, bidirectional);
  TORCH_CHECK(dy.sizes() == x.sizes(), "ema: expected dy of shape ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.device() == x.device(), "ema: dy must be on x's device");
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), N = pb.size(1);
  check_state(h0, x, N, "h0");
  check_state(dh_last, x, N, "dh_last");
  const auto t = pb.scalar_type();
  const int dirs = bidirectional ? 2 : 1;
  const int64_t Dp = padded_channels(D, t);
  const auto opts = x.options().dtype(t);
  Tensor h0c = opt_state(h0, t);
  Tensor dhLc = opt_state(dh_last, t);
  TORCH_CHECK(!bidirectional || (!h0c.defined() && !dhLc.defined() && !need_dh0),
              "ema: a bidirectional EMA carries no state");
  Tensor dx = at::empty({B, L, Dp}, opts);
  Tensor dcoef = at::zeros({B, 3, dirs, N, Dp}, opts);
  Tensor dh0 = need_dh0 ? at::zeros({B, D, N}, opts) : at::empty({0}, opts);
  if (L == 0) {
    if (need_dh0 && dhLc.defined()) dh0.copy_(dhLc);
  } else if (B > 0 && D > 0) {
    Tensor xl = channels_last(x, t, Dp);
    Tensor dyl = channels_last(dy, t, Dp);
    Tensor coef = pack_coefs(pb, q, g, dirs, D, Dp);
    const CpuProblem p = make_problem(B, L, D, Dp, N, dirs);
    AT_DISPATCH_FLOATING_TYPES(t, "ema_bwd_cpu", [&] {
      CpuBwdArgs<scalar_t> a{};
      a.x = xl.data_ptr<scalar_t>();
      a.dy = dyl.data_ptr<scalar_t>();
      a.coef = coef.data_ptr<scalar_t>();
      a.h0 = ptr_or_null<scalar_t>(h0c);
      a.dhL = ptr_or_null<scalar_t>(dhLc);
      a.dx = dx.data_ptr<scalar_t>();
      a.dcoef = dcoef.data_ptr<scalar_t>();
      a.dh0 = need_dh0 ? dh0.data_ptr<scalar_t>() : nullptr;
      run_backward<scalar_t>(p, a);
    });
  }
  // [B, 3, dirs, N, Dp] -> sum over batch -> [3, dirs * D, N]
  Tensor dc = dcoef.sum(0).narrow(3, 0, D).transpose(2, 3).reshape({3, dirs * D, N});
  if (Dp != D) dx = dx.narrow(2, 0, D);
  dx = dx.transpose(1, 2).to(x.scalar_type());
  return std::make_tuple(dx, dc[0], dc[1], dc[2], dh0);
}

std::tuple<Tensor, Tensor> ema_step_cpu(const Tensor& x, const std::optional<Tensor>& h0, const Tensor& pb,
                                        const Tensor& q, const Tensor& g) {
  TORCH_CHECK(x.dim() == 2, "ema_step: expected x of shape [batch, channels], got ", x.sizes());
  check_coefs(x.unsqueeze(-1), pb, q, g, false);
  const int64_t B = x.size(0), D = x.size(1), N = pb.size(1);
  const auto t = pb.scalar_type();
  const auto opts = x.options().dtype(t);
  check_state(h0, x.unsqueeze(-1), N, "h0");
  Tensor xc = x.to(t).contiguous();
  Tensor h0c = opt_state(h0, t);
  Tensor pbc = pb.contiguous(), qc = q.contiguous(), gc = g.contiguous();
  Tensor y = at::empty({B, D}, opts);
  Tensor h1 = at::empty({B, D, N}, opts);
  AT_DISPATCH_FLOATING_TYPES(t, "ema_step_cpu", [&] {
    CpuStepArgs<scalar_t> a{};
    a.x = xc.data_ptr<scalar_t>();
    a.h0 = ptr_or_null<scalar_t>(h0c);
    a.pb = pbc.data_ptr<scalar_t>();
    a.q = qc.data_ptr<scalar_t>();
    a.g = gc.data_ptr<scalar_t>();
    a.y = y.data_ptr<scalar_t>();
    a.h1 = h1.data_ptr<scalar_t>();
    a.B = B;
    a.D = D;
    a.N = N;
    a.nthreads = num_threads();
    step_cpu(a);
  });
  return std::make_tuple(y, h1);
}

}  // namespace
}  // namespace megatron_ext_ema

TORCH_LIBRARY(megatron_ext_ema, m) {
  m.def("ema_fwd(Tensor x, Tensor pb, Tensor q, Tensor g, Tensor? h0, bool bidirectional, bool return_state)"
        " -> (Tensor, Tensor)");
  m.def("ema_bwd(Tensor dy, Tensor x, Tensor pb, Tensor q, Tensor g, Tensor? h0, Tensor? dh_last,"
        " bool bidirectional, bool need_dh0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ema_step(Tensor x, Tensor? h0, Tensor pb, Tensor q, Tensor g) -> (Tensor, Tensor)");
  m.def("cpu_isa() -> str", &megatron_ext_ema::cpu_isa);
}

TORCH_LIBRARY_IMPL(megatron_ext_ema, CPU, m) {
  m.impl("ema_fwd", &megatron_ext_ema::ema_fwd_cpu);
  m.impl("ema_bwd", &megatron_ext_ema::ema_bwd_cpu);
  m.impl("ema_step", &megatron_ext_ema::ema_step_cpu);
}

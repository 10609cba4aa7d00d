// Torch binding of the CUDA EMA kernels: registers the CUDA implementations of the
// megatron_ext_ema operators defined in ema_cpu.cpp (that library must be loaded first).  Built
// only when torch has CUDA; the kernels themselves (ema_cuda_kernel.cu) include no torch header.
// Same operator contracts as the CPU ones (see ema_cpu.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "ema_cuda.h"

namespace megatron_ext_ema {
namespace {

using at::Tensor;

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    default: TORCH_CHECK(false, "ema (CUDA): x must be float16, bfloat16, float32 or float64, got ", t);
  }
  return cuda::DType::kFloat;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ema (CUDA) ", what, " failed: ", cudaGetErrorString(err));
}

void check_coefs(const Tensor& x, const Tensor& pb, const Tensor& q, const Tensor& g, bool bidirectional) {
  TORCH_CHECK(x.dim() == 3, "ema: expected x of shape [batch, channels, length], got ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "ema (CUDA): x must be a CUDA tensor");
  const int64_t kd = (bidirectional ? 2 : 1) * x.size(1);
  for (const Tensor* t : {&pb, &q, &g}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == kd && t->size(1) == pb.size(1) && pb.size(1) >= 1,
                "ema: expected pb, q, g of shape [", kd, ", N], got ", pb.sizes(), ", ", q.sizes(), ", ", g.sizes());
    TORCH_CHECK(t->scalar_type() == pb.scalar_type(), "ema: pb, q, g must share one dtype");
    TORCH_CHECK(t->device() == x.device(), "ema: pb, q, g must be on x's device");
  }
  const auto ct = pb.scalar_type();
  TORCH_CHECK(ct == at::kFloat || ct == at::kDouble, "ema: coefficients must be float32 or float64, got ", ct);
  TORCH_CHECK((x.scalar_type() == at::kDouble) == (ct == at::kDouble),
              "ema: float64 x needs float64 coefficients and vice versa");
  dtype_of(x.scalar_type());
}

void check_state(const std::optional<Tensor>& s, const Tensor& x, int64_t N, const char* name) {
  if (!s.has_value() || !s->defined()) return;
  TORCH_CHECK(s->dim() == 3 && s->size(0) == x.size(0) && s->size(1) == x.size(1) && s->size(2) == N,
              "ema: expected ", name, " of shape [", x.size(0), ", ", x.size(1), ", ", N, "], got ", s->sizes());
  TORCH_CHECK(s->device() == x.device(), "ema: ", name, " must be on x's device");
}

Tensor opt_state(const std::optional<Tensor>& s, at::ScalarType t) {
  if (!s.has_value() || !s->defined()) return Tensor();
  return s->to(t).contiguous();
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// pb, q, g [dirs * D, N] -> [3, dirs, N, D] contiguous.
Tensor pack_coefs(const Tensor& pb, const Tensor& q, const Tensor& g, int dirs, int64_t D) {
  return at::stack({pb, q, g}).view({3, dirs, D, pb.size(1)}).transpose(2, 3).contiguous();
}

// MEGATRON_EXT_EMA_CUDA_CHUNK=<T> forces the chunk length (tests use it to exercise many chunk carries).
cuda::Problem make_problem(int64_t B, int64_t L, int64_t D, int64_t N, int dirs, bool backward) {
  cuda::Problem p{};
  p.B = B;
  p.L = L;
  p.D = D;
  p.N = N;
  p.dirs = dirs;
  p.chunk = cuda::chunk_length(B, L, D, backward);
  if (const char* env = std::getenv("MEGATRON_EXT_EMA_CUDA_CHUNK")) {
    const long long forced = std::atoll(env);
    if (forced > 0) p.chunk = std::min<int64_t>(forced, std::max<int64_t>(L, 1));
  }
  p.nchunks = (L + p.chunk - 1) / p.chunk;
  return p;
}

std::tuple<Tensor, Tensor> ema_fwd_cuda(const Tensor& x, const Tensor& pb, const Tensor& q, const Tensor& g,
                                        const std::optional<Tensor>& h0, bool bidirectional, bool return_state) {
  check_coefs(x, pb, q, g, bidirectional);
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), N = pb.size(1);
  const bool has_h0 = h0.has_value() && h0->defined();
  TORCH_CHECK(!bidirectional || (!has_h0 && !return_state), "ema: a bidirectional EMA carries no state");
  check_state(h0, x, N, "h0");
  c10::cuda::CUDAGuard guard(x.device());
  const auto t = pb.scalar_type();
  const auto opts = x.options().dtype(t);
  const int dirs = bidirectional ? 2 : 1;
  Tensor h0c = opt_state(h0, t);
  Tensor y = at::empty({B, L, D}, opts);
  Tensor hL = return_state ? at::empty({B, D, N}, opts) : at::empty({0}, opts);
  if (L == 0) {
    if (return_state) hL = has_h0 ? h0c.clone() : at::zeros({B, D, N}, opts);
  } else if (B > 0 && D > 0) {
    Tensor xl = x.transpose(1, 2).contiguous();  // [B, L, D], x's dtype
    Tensor coef = pack_coefs(pb, q, g, dirs, D);
    const cuda::Problem p = make_problem(B, L, D, N, dirs, false);
    Tensor ws = at::empty({cuda::forward_workspace(p)}, opts);
    check(cuda::forward(p, dtype_of(x.scalar_type()), xl.data_ptr(), coef.data_ptr(), ptr_or_null(h0c),
                        y.data_ptr(), return_state ? hL.data_ptr() : nullptr, ws.data_ptr(),
                        c10::cuda::getCurrentCUDAStream().stream()),
          "forward");
  }
  return std::make_tuple(y.transpose(1, 2), hL);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ema_bwd_cuda(
    const Tensor& dy, const Tensor& x, const Tensor& pb, const Tensor& q, const Tensor& g,
    const std::optional<Tensor>& h0, const std::optional<Tensor>& dh_last, bool bidirectional, bool need_dh0) {
  check_coefs(x, pb, q, g, bidirectional);
  TORCH_CHECK(dy.sizes() == x.sizes(), "ema: expected dy of shape ", x.sizes(), ", got ", dy.sizes());
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), N = pb.size(1);
  check_state(h0, x, N, "h0");
  check_state(dh_last, x, N, "dh_last");
  c10::cuda::CUDAGuard guard(x.device());
  const auto t = pb.scalar_type();
  const auto opts = x.options().dtype(t);
  const int dirs = bidirectional ? 2 : 1;
  Tensor h0c = opt_state(h0, t);
  Tensor dhLc = opt_state(dh_last, t);
  const bool has_h0 = h0c.defined(), has_dhL = dhLc.defined();
  TORCH_CHECK(!bidirectional || (!has_h0 && !has_dhL && !need_dh0), "ema: a bidirectional EMA carries no state");
  Tensor coef = pack_coefs(pb, q, g, dirs, D);  // [3, dirs, N, D]
  Tensor dx = at::empty({B, L, D}, opts);
  Tensor dh0 = need_dh0 ? at::zeros({B, D, N}, opts) : at::empty({0}, opts);
  Tensor dpb, dq, dg;  // [dirs, N, D]
  if (L == 0 || B == 0 || D == 0) {
    dpb = at::zeros({dirs, N, D}, opts);
    dq = at::zeros({dirs, N, D}, opts);
    dg = at::zeros({dirs, N, D}, opts);
    if (need_dh0 && has_dhL && L == 0) dh0.copy_(dhLc);
  } else {
    Tensor xl = x.transpose(1, 2).contiguous();
    Tensor dyl = dy.to(t).transpose(1, 2).contiguous();
    const cuda::Problem p = make_problem(B, L, D, N, dirs, true);
    Tensor ws = at::empty({cuda::backward_workspace(p, has_h0)}, opts);
    Tensor partial = at::empty({cuda::backward_partial(p)}, opts);
    Tensor m_final = has_dhL ? at::empty({B, D, N}, opts) : Tensor();
    Tensor sq_final = has_dhL ? at::empty({B, D, N}, opts) : Tensor();
    check(cuda::backward(p, dtype_of(x.scalar_type()), xl.data_ptr(), dyl.data_ptr(), coef.data_ptr(),
                         ptr_or_null(h0c), ptr_or_null(dhLc), dx.data_ptr(), partial.data_ptr(),
                         need_dh0 ? dh0.data_ptr() : nullptr, has_dhL ? m_final.data_ptr() : nullptr,
                         has_dhL ? sq_final.data_ptr() : nullptr, ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
          "backward");
    // partial [B * nc, 3, dirs, N, D] -> sums S_P, S_Q, S_G
    Tensor S = partial.view({B * p.nchunks, 3, dirs, N, D}).sum(0);
    Tensor pbT = coef[0], gT = coef[2];
    dg = has_h0 ? S[2].clone() : pbT * S[0];
    dpb = gT * S[0];
    dq = gT * S[1];
    if (has_dhL) {  // direction 0 only (a bidirectional EMA has no state)
      dpb.select(0, 0).add_((dhLc * m_final).sum(0).transpose(0, 1));
      dq.select(0, 0).add_((dhLc * sq_final).sum(0).transpose(0, 1));
    }
    if (!has_h0) dq = pbT * dq;
  }
  auto to_kd = [&](const Tensor& v) { return v.transpose(1, 2).reshape({dirs * D, N}); };
  dx = dx.transpose(1, 2).to(x.scalar_type());
  return std::make_tuple(dx, to_kd(dpb), to_kd(dq), to_kd(dg), dh0);
}

std::tuple<Tensor, Tensor> ema_step_cuda(const Tensor& x, const std::optional<Tensor>& h0, const Tensor& pb,
                                         const Tensor& q, const Tensor& g) {
  TORCH_CHECK(x.dim() == 2, "ema_step: expected x of shape [batch, channels], got ", x.sizes());
  check_coefs(x.unsqueeze(-1), pb, q, g, false);
  const int64_t B = x.size(0), D = x.size(1), N = pb.size(1);
  check_state(h0, x.unsqueeze(-1), N, "h0");
  c10::cuda::CUDAGuard guard(x.device());
  const auto t = pb.scalar_type();
  const auto opts = x.options().dtype(t);
  Tensor xc = x.contiguous();
  Tensor h0c = opt_state(h0, t);
  Tensor pbc = pb.contiguous(), qc = q.contiguous(), gc = g.contiguous();
  Tensor y = at::empty({B, D}, opts);
  Tensor h1 = at::empty({B, D, N}, opts);
  if (B > 0 && D > 0)
    check(cuda::step(B, D, N, dtype_of(x.scalar_type()), xc.data_ptr(), ptr_or_null(h0c), pbc.data_ptr(),
                     qc.data_ptr(), gc.data_ptr(), y.data_ptr(), h1.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
          "step");
  return std::make_tuple(y, h1);
}

}  // namespace
}  // namespace megatron_ext_ema

TORCH_LIBRARY_IMPL(megatron_ext_ema, CUDA, m) {
  m.impl("ema_fwd", &megatron_ext_ema::ema_fwd_cuda);
  m.impl("ema_bwd", &megatron_ext_ema::ema_bwd_cuda);
  m.impl("ema_step", &megatron_ext_ema::ema_step_cuda);
}

// C++ CPU kernels of the fused ZO row loss (forward and backward); see rsm_ops.cpp for the
// structure shared by every op and rsm_fast/ops/decomposed.py for the math.
#include <tuple>

#include "rsm_ops.h"
#include "rsm_ops_detail.h"

namespace rsm_ops {
using namespace detail;
namespace {

// ---------------------------------------------------------------------------------------------
// ZO row loss
// ---------------------------------------------------------------------------------------------
// Row sums S_dz, S_dd (, S_ee) of one chunk; d = f_theta - f_old, e = f_theta - f_ref.
template <class scalar_t, class acc_t, bool kRef>
void zo_chunk_sums(const scalar_t* ft, const scalar_t* fo, const scalar_t* z, const scalar_t* fr, int64_t len,
                   acc_t* out) {
  acc_t a_dz[kLanes] = {}, a_dd[kLanes] = {}, a_ee[kLanes] = {};
  lane_loop(len, [&](int64_t i, int64_t j) {
    const acc_t f = ld<acc_t>(ft, i);
    const acc_t d = f - ld<acc_t>(fo, i);
    a_dz[j] += d * ld<acc_t>(z, i);
    a_dd[j] += d * d;
    if (kRef) {
      const acc_t e = f - ld<acc_t>(fr, i);
      a_ee[j] += e * e;
    }
  });
  out[0] = fold_lanes(a_dz);
  out[1] = fold_lanes(a_dd);
  out[2] = kRef ? fold_lanes(a_ee) : acc_t(0);
}

// Per-row outputs of the ZO epilogue (decomposed.zo_epilogue's return order).
template <class acc_t>
struct ZORow {
  acc_t loss, policy, kl;
  bool clipped;
  acc_t log_ratio, lin, d_lin, d_quad, d_kl;
};

// One row of decomposed.zo_epilogue, line by line (python floats become acc_t as in torch).
template <class acc_t>
ZORow<acc_t> zo_row_epilogue(acc_t S_dz, acc_t S_dd, acc_t S_ee, bool has_ref, acc_t norm, acc_t adv,
                             acc_t omega, acc_t sigma, acc_t dt, bool st, acc_t row_weight, acc_t kl_coef,
                             acc_t omega_train, int64_t form, int64_t reweight, double clip_eps,
                             double tempflow_scale, bool kl_dt_weight) {
  const acc_t one = 1, zero = 0;
  const acc_t lin = st ? omega * S_dz * norm : zero;
  const acc_t quad = st ? acc_t(0.5) * omega * omega * S_dd * norm : zero;
  const acc_t sig = (st && sigma > 0) ? sigma : one;
  const acc_t dtt = dt > 0 ? dt : one;
  acc_t s = one, o = one, c_lin = one, c_quad = one;
  if (reweight == 1) {
    s = static_cast<acc_t>(tempflow_scale) * sig;
  } else if (reweight == 2) {
    o = static_cast<acc_t>(tempflow_scale) * sig;
  } else if (reweight == 3) {
    s = sig * sig;
    o = one / (sig * sig);
  } else if (reweight == 4) {
    s = sig * sig;
    o = one / (sig * dtt);
  } else if (reweight == 5) {
    s = sig;
    o = one / dtt;
    c_quad = zero;
  } else if (reweight == 6) {
    const acc_t rho = omega > 0 ? omega_train / omega : zero;
    if (form == 2) {
      c_lin = rho;
      c_quad = rho * rho;
    } else {
      s = rho;
    }
  }
  const acc_t L = -s * (c_lin * lin + c_quad * quad);
  const acc_t A = adv;
  acc_t pol, dpol_dL;
  bool clipped;
  if (form == 0) {
    pol = -o * A * L;
    dpol_dL = -o * A;
    clipped = false;
  } else if (form == 1) {
    const acc_t lo = static_cast<acc_t>(1.0 - clip_eps), hi = static_cast<acc_t>(1.0 + clip_eps);
    const acc_t r = std::exp(L);
    clipped = (A > 0 && r > hi) || (A < 0 && r < lo);
    pol = o * (clipped ? -A * std::min(std::max(r, lo), hi) : -A * r);
    dpol_dL = clipped ? zero : -o * A * r;
  } else {
    const acc_t h = static_cast<acc_t>(clip_eps) * std::abs(A) - A * L;
    clipped = h < 0;
    pol = o * (clipped ? zero : h);
    dpol_dL = clipped ? zero : -o * A;
  }
  const acc_t W = row_weight;
  const acc_t policy = st ? W * pol : zero;
  clipped = clipped && st;
  const acc_t d_lin = st ? W * dpol_dL * (-s * c_lin) : zero;
  const acc_t d_quad = st ? W * dpol_dL * (-s * c_quad) : zero;
  const acc_t alpha = kl_dt_weight ? kl_coef * dt : kl_coef;
  acc_t kl = zero, d_kl = zero;
  if (has_ref) {
    d_kl = W * alpha;
    kl = d_kl * acc_t(0.5) * omega * omega * S_ee * norm;
  }
  return {policy + kl, policy, kl, clipped, -(lin + quad), lin, d_lin, d_quad, d_kl};
}

// grad = c_z z + c_d (f_theta - f_old) (+ c_e (f_theta - f_ref)) over one chunk.
template <class scalar_t, class acc_t, bool kRef>
void zo_grad_chunk(const scalar_t* ft, const scalar_t* fo, const scalar_t* z, const scalar_t* fr, acc_t c_z,
                   acc_t c_d, acc_t c_e, int64_t len, scalar_t* g) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t f = ld<acc_t>(ft, i);
    acc_t v = c_z * ld<acc_t>(z, i) + c_d * (f - ld<acc_t>(fo, i));
    if (kRef) v = v + c_e * (f - ld<acc_t>(fr, i));
    st(g, i, v);
  }
}

using ZOOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor>;

}  // namespace

ZOOut zo_fwd(const at::Tensor& f_theta, const at::Tensor& f_old, const at::Tensor& z, const OptTensor& f_ref,
             const at::Tensor& adv, const at::Tensor& omega, const at::Tensor& sigma, const at::Tensor& dt,
             const at::Tensor& stochastic, const at::Tensor& row_weight, const at::Tensor& kl_coef,
             const at::Tensor& omega_train, int64_t form, int64_t reweight, double clip_eps,
             double tempflow_scale, bool kl_dt_weight, bool mean) {
  const char* op = "rsm_fast zo_fwd";
  const Rows r = check_lead(op, "f_theta", f_theta);
  check_latent(op, "f_old", f_old, f_theta, "f_theta");
  check_latent(op, "z", z, f_theta, "f_theta");
  check_opt_latent(op, "f_ref", f_ref, f_theta, "f_theta");
  check_row(op, "adv", adv, r, r.compute);
  check_row(op, "omega", omega, r, r.compute);
  check_row(op, "sigma", sigma, r, r.compute);
  check_row(op, "dt", dt, r, r.compute);
  check_row(op, "stochastic", stochastic, r, at::kBool);
  check_row(op, "row_weight", row_weight, r, r.compute);
  check_row(op, "kl_coef", kl_coef, r, r.compute);
  check_row(op, "omega_train", omega_train, r, r.compute);
  TORCH_CHECK(form >= 0 && form <= 2, op, ": form must be in 0..2 (pg, ratio, hinge), got ", form);
  TORCH_CHECK(reweight >= 0 && reweight <= 6, op, ": reweight must be in 0..6, got ", reweight);
  const bool has_ref = present(f_ref);

  const RowBlock blk(9, r.B, r.compute);   // the outputs are views of one [9, B] block
  at::Tensor loss = blk.rows(0), policy = blk.rows(1), kl = blk.rows(2), clipped = blk.bools(3),
             log_ratio = blk.rows(4), lin = blk.rows(5), d_lin = blk.rows(6), d_quad = blk.rows(7),
             d_kl = blk.rows(8);
  const Tiling t(r);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.latent, "rsm_zo_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pf = f_theta.data_ptr<scalar_t>();
    const scalar_t* po = f_old.data_ptr<scalar_t>();
    const scalar_t* pz = z.data_ptr<scalar_t>();
    const scalar_t* pr = has_ref ? f_ref->data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> part(t.items() * 3);
    for_each_chunk(t, [&](int64_t it, int64_t, int64_t b, int64_t len) {
      if (has_ref)
        zo_chunk_sums<scalar_t, acc_t, true>(pf + b, po + b, pz + b, pr + b, len, &part[it * 3]);
      else
        zo_chunk_sums<scalar_t, acc_t, false>(pf + b, po + b, pz + b, nullptr, len, &part[it * 3]);
    });
    const std::vector<acc_t> S = reduce_rows(part, t, 3);
    const acc_t norm = static_cast<acc_t>(mean ? 1.0 / static_cast<double>(r.n) : 1.0);
    const acc_t *pA = adv.data_ptr<acc_t>(), *pw = omega.data_ptr<acc_t>(), *ps = sigma.data_ptr<acc_t>(),
                *pdt = dt.data_ptr<acc_t>(), *pW = row_weight.data_ptr<acc_t>(),
                *pk = kl_coef.data_ptr<acc_t>(), *pwt = omega_train.data_ptr<acc_t>();
    const bool* pst = stochastic.data_ptr<bool>();
    acc_t *o_loss = loss.data_ptr<acc_t>(), *o_policy = policy.data_ptr<acc_t>(), *o_kl = kl.data_ptr<acc_t>(),
          *o_logr = log_ratio.data_ptr<acc_t>(), *o_lin = lin.data_ptr<acc_t>(), *o_dlin = d_lin.data_ptr<acc_t>(),
          *o_dquad = d_quad.data_ptr<acc_t>(), *o_dkl = d_kl.data_ptr<acc_t>();
    bool* o_clipped = clipped.data_ptr<bool>();
    for (int64_t i = 0; i < r.B; ++i) {
      const ZORow<acc_t> row =
          zo_row_epilogue<acc_t>(S[3 * i], S[3 * i + 1], S[3 * i + 2], has_ref, norm, pA[i], pw[i], ps[i], pdt[i],
                                 pst[i], pW[i], pk[i], pwt[i], form, reweight, clip_eps, tempflow_scale, kl_dt_weight);
      o_loss[i] = row.loss;
      o_policy[i] = row.policy;
      o_kl[i] = row.kl;
      o_clipped[i] = row.clipped;
      o_logr[i] = row.log_ratio;
      o_lin[i] = row.lin;
      o_dlin[i] = row.d_lin;
      o_dquad[i] = row.d_quad;
      o_dkl[i] = row.d_kl;
    }
  });
  return {loss, policy, kl, clipped, log_ratio, lin, d_lin, d_quad, d_kl};
}

at::Tensor zo_bwd(const at::Tensor& g_loss, const at::Tensor& g_policy, const at::Tensor& g_kl,
                  const at::Tensor& f_theta, const at::Tensor& f_old, const at::Tensor& z, const OptTensor& f_ref,
                  const at::Tensor& omega, const at::Tensor& d_lin, const at::Tensor& d_quad, const at::Tensor& d_kl,
                  bool mean) {
  const char* op = "rsm_fast zo_bwd";
  const Rows r = check_lead(op, "f_theta", f_theta);
  check_latent(op, "f_old", f_old, f_theta, "f_theta");
  check_latent(op, "z", z, f_theta, "f_theta");
  check_opt_latent(op, "f_ref", f_ref, f_theta, "f_theta");
  check_row(op, "g_loss", g_loss, r, r.compute);
  check_row(op, "g_policy", g_policy, r, r.compute);
  check_row(op, "g_kl", g_kl, r, r.compute);
  check_row(op, "omega", omega, r, r.compute);
  check_row(op, "d_lin", d_lin, r, r.compute);
  check_row(op, "d_quad", d_quad, r, r.compute);
  check_row(op, "d_kl", d_kl, r, r.compute);
  const bool has_ref = present(f_ref);
  at::Tensor grad = at::empty_like(f_theta);
  const Tiling t(r);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.latent, "rsm_zo_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t norm = static_cast<acc_t>(mean ? 1.0 / static_cast<double>(r.n) : 1.0);
    // Per-row coefficients c_z, c_d, c_e (decomposed.zo_bwd).
    std::vector<acc_t> cz(r.B), cdd(r.B), ce(r.B);
    const acc_t *gl = g_loss.data_ptr<acc_t>(), *gp = g_policy.data_ptr<acc_t>(), *gk = g_kl.data_ptr<acc_t>(),
                *w = omega.data_ptr<acc_t>(), *dl = d_lin.data_ptr<acc_t>(), *dq = d_quad.data_ptr<acc_t>(),
                *dk = d_kl.data_ptr<acc_t>();
    for (int64_t i = 0; i < r.B; ++i) {
      const acc_t gP = gl[i] + gp[i];
      cz[i] = gP * dl[i] * w[i] * norm;
      cdd[i] = gP * dq[i] * w[i] * w[i] * norm;
      ce[i] = has_ref ? (gl[i] + gk[i]) * dk[i] * w[i] * w[i] * norm : acc_t(0);
    }
    const scalar_t* pf = f_theta.data_ptr<scalar_t>();
    const scalar_t* po = f_old.data_ptr<scalar_t>();
    const scalar_t* pz = z.data_ptr<scalar_t>();
    const scalar_t* pr = has_ref ? f_ref->data_ptr<scalar_t>() : nullptr;
    scalar_t* pg = grad.data_ptr<scalar_t>();
    for_each_chunk(t, [&](int64_t, int64_t row, int64_t b, int64_t len) {
      if (has_ref)
        zo_grad_chunk<scalar_t, acc_t, true>(pf + b, po + b, pz + b, pr + b, cz[row], cdd[row], ce[row], len, pg + b);
      else
        zo_grad_chunk<scalar_t, acc_t, false>(pf + b, po + b, pz + b, nullptr, cz[row], cdd[row], ce[row], len, pg + b);
    });
  });
  return grad;
}

}  // namespace rsm_ops

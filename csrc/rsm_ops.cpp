// C++ CPU kernels of the fused RSM ops. The math, signatures and conventions are those of
// rsm_fast/ops/decomposed.py (the contract every backend implements); read that file first.
//
// Structure of every op:
//   * the latent data is viewed as [B, n] and cut into fixed-size chunks of one row; a work item
//     is one (row, chunk) pair, so a few long rows still keep every thread busy;
//   * forward: each work item writes its partial row sums into its own slot of a
//     [items, nsums] buffer; the slots of a row are then added in chunk order, and an O(B)
//     per-row epilogue (zo_row_epilogue mirrors decomposed.zo_epilogue line by line) finishes.
//     Chunk boundaries and the summation order inside a chunk do not depend on the number of
//     threads, so the results are bitwise identical for any thread count;
//   * backward: one elementwise pass with per-row coefficients, written in the latent dtype.
// Arithmetic is float (double for double latents); bf16/fp16 elements are converted one by one,
// so no latent-sized fp32 temporary is ever allocated.
// This file holds the score-regression loss, the sampler step and the Python bindings; the ZO
// loss is in rsm_zo.cpp, the forward-process loss in rsm_fp.cpp and the shared building blocks in
// rsm_ops_detail.h.
#include <torch/extension.h>

#include <tuple>

#include "rsm_ops.h"
#include "rsm_ops_detail.h"

namespace rsm_ops {
using namespace detail;


// ---------------------------------------------------------------------------------------------
// Score regression: t = s - s_ref - gamma psi, o = s - s_old
// ---------------------------------------------------------------------------------------------
namespace {
template <class scalar_t, class acc_t, bool kOld>
void score_chunk_sums(const scalar_t* s, const scalar_t* sr, const scalar_t* psi, const scalar_t* so, acc_t gamma,
                      int64_t len, acc_t* out) {
  acc_t a_tt[kLanes] = {}, a_oo[kLanes] = {};
  lane_loop(len, [&](int64_t i, int64_t j) {
    const acc_t x = ld<acc_t>(s, i);
    const acc_t tt = x - ld<acc_t>(sr, i) - gamma * ld<acc_t>(psi, i);
    a_tt[j] += tt * tt;
    if (kOld) {
      const acc_t oo = x - ld<acc_t>(so, i);
      a_oo[j] += oo * oo;
    }
  });
  out[0] = fold_lanes(a_tt);
  out[1] = kOld ? fold_lanes(a_oo) : acc_t(0);
}

// grad = k (t + C2 o) over one chunk (k = 2 g C1 norm).
template <class scalar_t, class acc_t, bool kOld>
void score_grad_chunk(const scalar_t* s, const scalar_t* sr, const scalar_t* psi, const scalar_t* so, acc_t k,
                      acc_t gamma, acc_t c2, int64_t len, scalar_t* g) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t x = ld<acc_t>(s, i);
    acc_t v = x - ld<acc_t>(sr, i) - gamma * ld<acc_t>(psi, i);
    if (kOld) v = v + c2 * (x - ld<acc_t>(so, i));
    st(g, i, k * v);
  }
}

void check_score(const char* op, const Rows& r, const at::Tensor& s, const at::Tensor& s_ref, const at::Tensor& psi,
                 const OptTensor& s_old, const at::Tensor& c1, const at::Tensor& gamma, const at::Tensor& c2) {
  check_latent(op, "s_ref", s_ref, s, "s");
  check_latent(op, "psi", psi, s, "s");
  check_opt_latent(op, "s_old", s_old, s, "s");
  check_row(op, "c1", c1, r, r.compute);
  check_row(op, "gamma", gamma, r, r.compute);
  check_row(op, "c2", c2, r, r.compute);
}
}  // namespace

at::Tensor score_fwd(const at::Tensor& s, const at::Tensor& s_ref, const at::Tensor& psi, const OptTensor& s_old,
                     const at::Tensor& c1, const at::Tensor& gamma, const at::Tensor& c2, bool mean) {
  const char* op = "rsm_fast score_fwd";
  const Rows r = check_lead(op, "s", s);
  check_score(op, r, s, s_ref, psi, s_old, c1, gamma, c2);
  const bool has_old = present(s_old);
  at::Tensor loss = at::empty({r.B}, opts(r.compute));
  const Tiling t(r);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.latent, "rsm_score_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *ps = s.data_ptr<scalar_t>(), *pr = s_ref.data_ptr<scalar_t>(), *pp = psi.data_ptr<scalar_t>();
    const scalar_t* po = has_old ? s_old->data_ptr<scalar_t>() : nullptr;
    const acc_t *pc1 = c1.data_ptr<acc_t>(), *pg = gamma.data_ptr<acc_t>(), *pc2 = c2.data_ptr<acc_t>();
    std::vector<acc_t> part(t.items() * 2);
    for_each_chunk(t, [&](int64_t it, int64_t row, int64_t b, int64_t len) {
      if (has_old)
        score_chunk_sums<scalar_t, acc_t, true>(ps + b, pr + b, pp + b, po + b, pg[row], len, &part[it * 2]);
      else
        score_chunk_sums<scalar_t, acc_t, false>(ps + b, pr + b, pp + b, nullptr, pg[row], len, &part[it * 2]);
    });
    const std::vector<acc_t> S = reduce_rows(part, t, 2);
    const acc_t norm = static_cast<acc_t>(mean ? 1.0 / static_cast<double>(r.n) : 1.0);
    acc_t* out = loss.data_ptr<acc_t>();
    for (int64_t i = 0; i < r.B; ++i) {
      acc_t acc = S[2 * i];
      if (has_old) acc = acc + pc2[i] * S[2 * i + 1];
      out[i] = pc1[i] * norm * acc;
    }
  });
  return loss;
}

at::Tensor score_bwd(const at::Tensor& g_loss, const at::Tensor& s, const at::Tensor& s_ref, const at::Tensor& psi,
                     const OptTensor& s_old, const at::Tensor& c1, const at::Tensor& gamma, const at::Tensor& c2,
                     bool mean) {
  const char* op = "rsm_fast score_bwd";
  const Rows r = check_lead(op, "s", s);
  check_score(op, r, s, s_ref, psi, s_old, c1, gamma, c2);
  check_row(op, "g_loss", g_loss, r, r.compute);
  const bool has_old = present(s_old);
  at::Tensor grad = at::empty_like(s);
  const Tiling t(r);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.latent, "rsm_score_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t norm = static_cast<acc_t>(mean ? 1.0 / static_cast<double>(r.n) : 1.0);
    const scalar_t *ps = s.data_ptr<scalar_t>(), *pr = s_ref.data_ptr<scalar_t>(), *pp = psi.data_ptr<scalar_t>();
    const scalar_t* po = has_old ? s_old->data_ptr<scalar_t>() : nullptr;
    const acc_t *pgl = g_loss.data_ptr<acc_t>(), *pc1 = c1.data_ptr<acc_t>(), *pg = gamma.data_ptr<acc_t>(),
                *pc2 = c2.data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    for_each_chunk(t, [&](int64_t, int64_t row, int64_t b, int64_t len) {
      const acc_t k = acc_t(2) * pgl[row] * pc1[row] * norm;
      if (has_old)
        score_grad_chunk<scalar_t, acc_t, true>(ps + b, pr + b, pp + b, po + b, k, pg[row], pc2[row], len, out + b);
      else
        score_grad_chunk<scalar_t, acc_t, false>(ps + b, pr + b, pp + b, nullptr, k, pg[row], pc2[row], len, out + b);
    });
  });
  return grad;
}

// ---------------------------------------------------------------------------------------------
// Sampler step: x' = c_x x + c_f f + sigma z (sigma -> 0 on ODE rows), log pi(x'|x) per row
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> step_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& z,
                                            const at::Tensor& c_x, const at::Tensor& c_f, const at::Tensor& sigma,
                                            const at::Tensor& stochastic, bool mean) {
  const char* op = "rsm_fast step_fwd";
  const Rows r = check_lead(op, "x", x);
  check_latent(op, "f", f, x, "x");
  check_latent(op, "z", z, x, "x");
  check_row(op, "c_x", c_x, r, r.compute);
  check_row(op, "c_f", c_f, r, r.compute);
  check_row(op, "sigma", sigma, r, r.compute);
  check_row(op, "stochastic", stochastic, r, at::kBool);
  at::Tensor xn = at::empty_like(x);
  at::Tensor lp = at::empty({r.B}, opts(r.compute));
  const Tiling t(r);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.latent, "rsm_step_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pf = f.data_ptr<scalar_t>(), *pz = z.data_ptr<scalar_t>();
    scalar_t* pn = xn.data_ptr<scalar_t>();
    const acc_t *pcx = c_x.data_ptr<acc_t>(), *pcf = c_f.data_ptr<acc_t>(), *ps = sigma.data_ptr<acc_t>();
    const bool* pst = stochastic.data_ptr<bool>();
    std::vector<acc_t> part(t.items());
    for_each_chunk(t, [&](int64_t it, int64_t row, int64_t b, int64_t len) {
      const acc_t cx = pcx[row], cf = pcf[row], sn = pst[row] ? ps[row] : acc_t(0);
      const scalar_t *xx = px + b, *ff = pf + b, *zz = pz + b;
      scalar_t* out = pn + b;
      acc_t a_zz[kLanes] = {};
      lane_loop(len, [&](int64_t i, int64_t j) {
        const acc_t zv = ld<acc_t>(zz, i);
        st(out, i, cx * ld<acc_t>(xx, i) + cf * ld<acc_t>(ff, i) + sn * zv);
        a_zz[j] += zv * zv;
      });
      part[it] = fold_lanes(a_zz);
    });
    const std::vector<acc_t> S = reduce_rows(part, t, 1);
    const acc_t norm = static_cast<acc_t>(mean ? 1.0 / static_cast<double>(r.n) : 1.0);
    const acc_t scale = static_cast<acc_t>(mean ? 1.0 : static_cast<double>(r.n));
    const acc_t log_sqrt_2pi = static_cast<acc_t>(0.5 * std::log(2.0 * M_PI));
    acc_t* out = lp.data_ptr<acc_t>();
    for (int64_t i = 0; i < r.B; ++i) {
      const acc_t sig = (pst[i] && ps[i] > 0) ? ps[i] : acc_t(1);
      const acc_t consts = (std::log(sig) + log_sqrt_2pi) * scale;
      out[i] = pst[i] ? acc_t(-0.5) * S[i] * norm - consts : acc_t(0);
    }
  });
  return {xn, lp};
}

}  // namespace rsm_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "rsm_fast C++ CPU kernels of the fused RSM ops (see rsm_fast/ops/decomposed.py for the math)";
  m.def("zo_fwd", &rsm_ops::zo_fwd,
        "ZO row loss forward -> (loss, policy, kl, clipped, log_ratio, lin, d_lin, d_quad, d_kl)",
        py::arg("f_theta"), py::arg("f_old"), py::arg("z"), py::arg("f_ref"), py::arg("adv"), py::arg("omega"),
        py::arg("sigma"), py::arg("dt"), py::arg("stochastic"), py::arg("row_weight"), py::arg("kl_coef"),
        py::arg("omega_train"), py::arg("form"), py::arg("reweight"), py::arg("clip_eps"), py::arg("tempflow_scale"),
        py::arg("kl_dt_weight"), py::arg("mean"));
  m.def("zo_bwd", &rsm_ops::zo_bwd, "ZO row loss backward: gradient w.r.t. f_theta", py::arg("g_loss"),
        py::arg("g_policy"), py::arg("g_kl"), py::arg("f_theta"), py::arg("f_old"), py::arg("z"), py::arg("f_ref"),
        py::arg("omega"), py::arg("d_lin"), py::arg("d_quad"), py::arg("d_kl"), py::arg("mean"));
  m.def("fp_fwd", &rsm_ops::fp_fwd,
        "forward-process loss (NFT / AWM) -> (loss, policy, kl, ema_kl, aux, clipped, coef) (rsm_fp.cpp)",
        py::arg("v"), py::arg("v_old"), py::arg("xa"), py::arg("x0"), py::arg("v_ref"), py::arg("v_ema"),
        py::arg("t"), py::arg("w"), py::arg("logp_old"), py::arg("kl_coef"), py::arg("ema_coef"), py::arg("kind"),
        py::arg("beta"), py::arg("scale"), py::arg("weighting"), py::arg("power"), py::arg("clip"),
        py::arg("mean"));
  m.def("fp_bwd", &rsm_ops::fp_bwd, "forward-process loss backward: gradient w.r.t. v", py::arg("g_loss"),
        py::arg("g_policy"), py::arg("g_kl"), py::arg("g_ema"), py::arg("v"), py::arg("v_old"), py::arg("xa"),
        py::arg("x0"), py::arg("v_ref"), py::arg("v_ema"), py::arg("t"), py::arg("kl_coef"), py::arg("ema_coef"),
        py::arg("coef"), py::arg("kind"), py::arg("beta"), py::arg("mean"));
  m.def("score_fwd", &rsm_ops::score_fwd, "score-regression loss per row", py::arg("s"), py::arg("s_ref"),
        py::arg("psi"), py::arg("s_old"), py::arg("c1"), py::arg("gamma"), py::arg("c2"), py::arg("mean"));
  m.def("score_bwd", &rsm_ops::score_bwd, "score-regression gradient w.r.t. s", py::arg("g_loss"), py::arg("s"),
        py::arg("s_ref"), py::arg("psi"), py::arg("s_old"), py::arg("c1"), py::arg("gamma"), py::arg("c2"),
        py::arg("mean"));
  m.def("step_fwd", &rsm_ops::step_fwd, "sampler step -> (x_next, log_prob)", py::arg("x"), py::arg("f"),
        py::arg("z"), py::arg("c_x"), py::arg("c_f"), py::arg("sigma"), py::arg("stochastic"), py::arg("mean"));
  m.def("philox_normal", &rsm_ops::philox_normal, "Philox-4x32-10 Box-Muller normals [R, numel] (rsm_noise.cpp)",
        py::arg("row_keys"), py::arg("steps"), py::arg("step"), py::arg("seed"), py::arg("block0"), py::arg("numel"),
        py::arg("dtype"));
  m.def("philox_words", &rsm_ops::philox_words, "Philox-4x32-10 raw uint32 words as int64 [R, numel]",
        py::arg("row_keys"), py::arg("steps"), py::arg("step"), py::arg("seed"), py::arg("block0"), py::arg("numel"));
}

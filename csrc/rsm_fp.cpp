// C++ CPU kernels of the fused forward-process loss (DiffusionNFT / AWM), forward and backward; see
// rsm_ops.cpp for the structure shared by every op and rsm_fast/ops/decomposed_fp.py for the math
// (fp_row_epilogue mirrors decomposed_fp.fp_epilogue line by line).
//
// The variant (kind, v_ref present, v_ema present) is a template parameter of the element loops
// and is chosen once per call, outside the (row, chunk) loop, so each of the eight loops reads
// only the streams its variant needs and has no per-element branch to keep it from vectorising.
#include <tuple>
#include <type_traits>

#include "rsm_ops.h"
#include "rsm_ops_detail.h"

namespace rsm_ops {
using namespace detail;
namespace {

constexpr int kNFT = 0, kAWM = 1;
constexpr int kSums = 6;  // decomposed_fp.NSUMS
// decomposed_fp's constants (the released scripts' offsets), as double; each use casts to acc_t
// like torch casts a Python float against a tensor of the compute dtype.
constexpr double kWeightFloor = 1e-5;   // NFT_WEIGHT_FLOOR
constexpr double kMseEps = 1e-10;       // AWM_MSE_EPS
constexpr double kHuberOffset = 1e-5;   // HUBER_OFFSET

// The latent streams of one call; absent optional tensors are nullptr (never read: the loops
// that would read them are not instantiated for that variant).
template <class scalar_t>
struct Streams {
  const scalar_t *v, *vo, *xa, *x0, *vr, *ve;
};

// Calls f(kind, has_ref, has_ema) with the three as std::integral_constant, so that the callee can
// instantiate the element loops on them.
template <class F>
void with_variant(int64_t kind, bool has_ref, bool has_ema, const F& f) {
  const auto ema = [&](auto K, auto R) {
    if (has_ema)
      f(K, R, std::true_type{});
    else
      f(K, R, std::false_type{});
  };
  const auto ref = [&](auto K) {
    if (has_ref)
      ema(K, std::true_type{});
    else
      ema(K, std::false_type{});
  };
  if (kind == kNFT)
    ref(std::integral_constant<int, kNFT>{});
  else
    ref(std::integral_constant<int, kAWM>{});
}

// The elementwise parts (X0, X1) of decomposed_fp._parts at element i: NFT (ep, en), AWM (m, -).
// tc = t, tb = t beta of the row.
template <int kKind, class scalar_t, class acc_t>
inline void parts(const Streams<scalar_t>& s, int64_t i, acc_t vv, acc_t tc, acc_t tb, acc_t& x0, acc_t& x1) {
  if (kKind == kNFT) {
    const acc_t vo = ld<acc_t>(s.vo, i);
    const acc_t c = (ld<acc_t>(s.xa, i) - ld<acc_t>(s.x0, i)) - tc * vo;
    const acc_t d = vv - vo;
    x0 = c - tb * d;
    x1 = c + tb * d;
  } else {
    x0 = vv - (ld<acc_t>(s.xa, i) - ld<acc_t>(s.x0, i));
    x1 = acc_t(0);
  }
}

// The six row sums of one chunk starting at flat offset b (module docstring of decomposed_fp):
// NFT (ep^2, en^2, |ep|, |en|, e^2, f^2), AWM (m^2, 0, 0, 0, e^2, f^2).
template <int kKind, bool kRef, bool kEma, class scalar_t, class acc_t>
void fp_chunk_sums(const Streams<scalar_t>& s0, int64_t b, acc_t tc, acc_t tb, int64_t len, acc_t* out) {
  const Streams<scalar_t> s{s0.v + b,  kKind == kNFT ? s0.vo + b : nullptr, s0.xa + b, s0.x0 + b,
                            kRef ? s0.vr + b : nullptr, kEma ? s0.ve + b : nullptr};
  acc_t a_pp[kLanes] = {}, a_nn[kLanes] = {}, a_p[kLanes] = {}, a_n[kLanes] = {}, a_ee[kLanes] = {},
        a_ff[kLanes] = {};
  lane_loop(len, [&](int64_t i, int64_t j) {
    const acc_t vv = ld<acc_t>(s.v, i);
    acc_t x0, x1;
    parts<kKind>(s, i, vv, tc, tb, x0, x1);
    a_pp[j] += x0 * x0;
    if (kKind == kNFT) {
      a_nn[j] += x1 * x1;
      a_p[j] += std::abs(x0);
      a_n[j] += std::abs(x1);
    }
    if (kRef) {
      const acc_t e = vv - ld<acc_t>(s.vr, i);
      a_ee[j] += e * e;
    }
    if (kEma) {
      const acc_t f = vv - ld<acc_t>(s.ve, i);
      a_ff[j] += f * f;
    }
  });
  out[0] = fold_lanes(a_pp);
  out[1] = kKind == kNFT ? fold_lanes(a_nn) : acc_t(0);
  out[2] = kKind == kNFT ? fold_lanes(a_p) : acc_t(0);
  out[3] = kKind == kNFT ? fold_lanes(a_n) : acc_t(0);
  out[4] = kRef ? fold_lanes(a_ee) : acc_t(0);
  out[5] = kEma ? fold_lanes(a_ff) : acc_t(0);
}

// torch.maximum: NaN in either operand propagates.
template <class acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (std::isnan(a) || a > b) ? a : b;
}

// torch.clamp(x, lo, hi): NaN propagates (std::max/std::min return their first argument then).
template <class acc_t>
inline acc_t clamp(acc_t x, acc_t lo, acc_t hi) {
  return std::min(std::max(x, lo), hi);
}

// Per-row outputs of the epilogue (decomposed_fp.fp_epilogue's return order).
template <class acc_t>
struct FPRow {
  acc_t loss, policy, kl, ema_kl;
  acc_t aux[4];
  bool clipped;
  acc_t d0, d1;
};

// One row of decomposed_fp.fp_epilogue, line by line (Python floats become acc_t as in torch;
// products of two Python floats are formed in double first, as Python does). `has_old` says
// whether logp_old was given (else the ratio is exactly 1).
template <class acc_t>
FPRow<acc_t> fp_row_epilogue(const acc_t* S, acc_t norm, acc_t t, acc_t w, bool has_old, acc_t logp_old,
                             acc_t kl_coef, acc_t ema_coef, int64_t kind, double beta, double scale,
                             int64_t weighting, double power, double clip) {
  const acc_t zero = 0, one = 1;
  FPRow<acc_t> r;
  r.kl = norm * S[4];
  r.ema_kl = norm * S[5];
  if (kind == kNFT) {
    const acc_t floor = static_cast<acc_t>(kWeightFloor);
    const acc_t w_pos = std::max(norm * S[2], floor);
    const acc_t w_neg = std::max(norm * S[3], floor);
    const acc_t l_pos = norm * S[0] / w_pos, l_neg = norm * S[1] / w_neg;
    r.policy = static_cast<acc_t>(scale) * (w * l_pos + (one - w) * l_neg) / static_cast<acc_t>(beta);
    r.d0 = static_cast<acc_t>(-2.0 * scale) * t * w / w_pos;
    r.d1 = static_cast<acc_t>(2.0 * scale) * t * (one - w) / w_neg;
    r.aux[0] = w_pos;
    r.aux[1] = w_neg;
    r.aux[2] = l_pos;
    r.aux[3] = l_neg;
    r.clipped = false;
  } else {
    const acc_t mse = norm * S[0];
    const acc_t eps = static_cast<acc_t>(kMseEps);
    acc_t lp, dl;
    if (weighting == 0) {
      lp = -mse;
      dl = -one;
    } else if (weighting == 1) {
      lp = -mse * t;
      dl = -t;
    } else if (weighting == 2) {
      lp = -mse * t * t;
      dl = -t * t;
    } else if (weighting == 3) {
      const acc_t q = std::sqrt(mse + eps);
      lp = -(q - static_cast<acc_t>(kHuberOffset)) * t;
      dl = acc_t(-0.5) * t / q;
    } else {
      const acc_t p = static_cast<acc_t>(power);
      const acc_t q = std::pow(mse + eps, p);
      const acc_t floor = std::pow(eps, p);
      lp = -(q - floor) * t / p;
      dl = -t * q / (mse + eps);
    }
    const acc_t ratio = has_old ? std::exp(lp - logp_old) : one;
    const acc_t a = w;
    const acc_t lo = static_cast<acc_t>(1.0 - clip), hi = static_cast<acc_t>(1.0 + clip);
    const acc_t rc = clamp(ratio, lo, hi);
    const acc_t pu = a == 0 ? zero : -a * ratio;
    const acc_t pc = -a * rc;
    r.policy = nan_max(pu, pc);
    const bool inside = ratio >= lo && ratio <= hi;
    const acc_t dpdr = (inside || pu > pc) ? -a : zero;
    r.clipped = (a > 0 && ratio > hi) || (a < 0 && ratio < lo);
    r.d0 = dpdr == zero ? zero : acc_t(2) * dpdr * ratio * dl;  // 0, not 0 * inf, on a clipped overflow
    r.d1 = zero;
    r.aux[0] = lp;
    r.aux[1] = ratio;
    r.aux[2] = mse;
    r.aux[3] = zero;
  }
  r.loss = r.policy + kl_coef * r.kl + ema_coef * r.ema_kl;
  return r;
}

// grad = k0 X0 (+ k1 X1) (+ ke e) (+ kf f) over one chunk starting at flat offset b.
template <int kKind, bool kRef, bool kEma, class scalar_t, class acc_t>
void fp_grad_chunk(const Streams<scalar_t>& s0, int64_t b, acc_t tc, acc_t tb, acc_t k0, acc_t k1, acc_t ke,
                   acc_t kf, int64_t len, scalar_t* g) {
  const Streams<scalar_t> s{s0.v + b,  kKind == kNFT ? s0.vo + b : nullptr, s0.xa + b, s0.x0 + b,
                            kRef ? s0.vr + b : nullptr, kEma ? s0.ve + b : nullptr};
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t vv = ld<acc_t>(s.v, i);
    acc_t x0, x1;
    parts<kKind>(s, i, vv, tc, tb, x0, x1);
    acc_t out = k0 * x0;
    if (kKind == kNFT) out = out + k1 * x1;
    if (kRef) out = out + ke * (vv - ld<acc_t>(s.vr, i));
    if (kEma) out = out + kf * (vv - ld<acc_t>(s.ve, i));
    st(g, i, out);
  }
}

// The latent checks shared by fp_fwd and fp_bwd; -> the row layout.
Rows check_fp_latents(const char* op, const at::Tensor& v, const OptTensor& v_old, const at::Tensor& xa,
                      const at::Tensor& x0, const OptTensor& v_ref, const OptTensor& v_ema, int64_t kind) {
  const Rows r = check_lead(op, "v", v);
  TORCH_CHECK(kind == kNFT || kind == kAWM, op, ": kind must be 0 (nft) or 1 (awm), got ", kind);
  TORCH_CHECK(kind != kNFT || present(v_old), op, ": v_old must be a tensor for kind 0 (nft), got None");
  check_opt_latent(op, "v_old", v_old, v, "v");
  check_latent(op, "xa", xa, v, "v");
  check_latent(op, "x0", x0, v, "v");
  check_opt_latent(op, "v_ref", v_ref, v, "v");
  check_opt_latent(op, "v_ema", v_ema, v, "v");
  return r;
}

// The typed pointers of a call's latents (nullptr for the absent optional ones).
template <class scalar_t>
Streams<scalar_t> streams(const at::Tensor& v, const OptTensor& v_old, const at::Tensor& xa, const at::Tensor& x0,
                          const OptTensor& v_ref, const OptTensor& v_ema) {
  const auto p = [](const OptTensor& t) { return present(t) ? t->data_ptr<scalar_t>() : nullptr; };
  return {v.data_ptr<scalar_t>(), p(v_old), xa.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(), p(v_ref), p(v_ema)};
}

using FPOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace

FPOut fp_fwd(const at::Tensor& v, const OptTensor& v_old, const at::Tensor& xa, const at::Tensor& x0,
             const OptTensor& v_ref, const OptTensor& v_ema, const at::Tensor& t, const at::Tensor& w,
             const OptTensor& logp_old, const at::Tensor& kl_coef, const at::Tensor& ema_coef, int64_t kind,
             double beta, double scale, int64_t weighting, double power, double clip, bool mean) {
  const char* op = "rsm_fast fp_fwd";
  const Rows r = check_fp_latents(op, v, v_old, xa, x0, v_ref, v_ema, kind);
  check_row(op, "t", t, r, r.compute);
  check_row(op, "w", w, r, r.compute);
  if (present(logp_old)) check_row(op, "logp_old", *logp_old, r, r.compute);
  check_row(op, "kl_coef", kl_coef, r, r.compute);
  check_row(op, "ema_coef", ema_coef, r, r.compute);
  TORCH_CHECK(weighting >= 0 && weighting <= 4, op,
              ": weighting must be in 0..4 (uniform, t, t**2, huber, ghuber), got ", weighting);
  const bool has_ref = present(v_ref), has_ema = present(v_ema), has_old = present(logp_old);

  const RowBlock blk(11, r.B, r.compute);   // the outputs are views of one [11, B] block
  at::Tensor loss = blk.rows(0), policy = blk.rows(1), kl = blk.rows(2), ema_kl = blk.rows(3),
             aux = blk.rows(4, 4), clipped = blk.bools(10), coef = blk.rows(8, 2);
  const Tiling tl(r);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.latent, "rsm_fp_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Streams<scalar_t> s = streams<scalar_t>(v, v_old, xa, x0, v_ref, v_ema);
    const acc_t* pt = t.data_ptr<acc_t>();
    const acc_t b_ = static_cast<acc_t>(beta);
    std::vector<acc_t> part(tl.items() * kSums);
    with_variant(kind, has_ref, has_ema, [&](auto K, auto R, auto E) {
      constexpr int kK = decltype(K)::value;
      constexpr bool kR = decltype(R)::value, kE = decltype(E)::value;
      for_each_chunk(tl, [&](int64_t it, int64_t row, int64_t b, int64_t len) {
        fp_chunk_sums<kK, kR, kE>(s, b, pt[row], pt[row] * b_, len, &part[it * kSums]);
      });
    });
    const std::vector<acc_t> S = reduce_rows(part, tl, kSums);
    const acc_t norm = static_cast<acc_t>(mean ? 1.0 / static_cast<double>(r.n) : 1.0);
    const acc_t *pw = w.data_ptr<acc_t>(), *pk = kl_coef.data_ptr<acc_t>(), *pe = ema_coef.data_ptr<acc_t>();
    const acc_t* plo = has_old ? logp_old->data_ptr<acc_t>() : nullptr;
    acc_t *o_loss = loss.data_ptr<acc_t>(), *o_policy = policy.data_ptr<acc_t>(), *o_kl = kl.data_ptr<acc_t>(),
          *o_ema = ema_kl.data_ptr<acc_t>(), *o_aux = aux.data_ptr<acc_t>(), *o_coef = coef.data_ptr<acc_t>();
    bool* o_clipped = clipped.data_ptr<bool>();
    for (int64_t i = 0; i < r.B; ++i) {
      const FPRow<acc_t> row = fp_row_epilogue<acc_t>(&S[kSums * i], norm, pt[i], pw[i], has_old,
                                                      has_old ? plo[i] : acc_t(0), pk[i], pe[i], kind, beta, scale,
                                                      weighting, power, clip);
      o_loss[i] = row.loss;
      o_policy[i] = row.policy;
      o_kl[i] = row.kl;
      o_ema[i] = row.ema_kl;
      for (int k = 0; k < 4; ++k) o_aux[4 * i + k] = row.aux[k];
      o_clipped[i] = row.clipped;
      o_coef[2 * i] = row.d0;
      o_coef[2 * i + 1] = row.d1;
    }
  });
  return {loss, policy, kl, ema_kl, aux, clipped, coef};
}

at::Tensor fp_bwd(const at::Tensor& g_loss, const at::Tensor& g_policy, const at::Tensor& g_kl,
                  const at::Tensor& g_ema, const at::Tensor& v, const OptTensor& v_old, const at::Tensor& xa,
                  const at::Tensor& x0, const OptTensor& v_ref, const OptTensor& v_ema, const at::Tensor& t,
                  const at::Tensor& kl_coef, const at::Tensor& ema_coef, const at::Tensor& coef, int64_t kind,
                  double beta, bool mean) {
  const char* op = "rsm_fast fp_bwd";
  const Rows r = check_fp_latents(op, v, v_old, xa, x0, v_ref, v_ema, kind);
  check_row(op, "g_loss", g_loss, r, r.compute);
  check_row(op, "g_policy", g_policy, r, r.compute);
  check_row(op, "g_kl", g_kl, r, r.compute);
  check_row(op, "g_ema", g_ema, r, r.compute);
  check_row(op, "t", t, r, r.compute);
  check_row(op, "kl_coef", kl_coef, r, r.compute);
  check_row(op, "ema_coef", ema_coef, r, r.compute);
  TORCH_CHECK(coef.defined() && coef.device().is_cpu(), op, ": coef must be a CPU tensor");
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == r.B && coef.size(1) == 2, op, ": coef must have shape [", r.B,
              ", 2], got ", coef.sizes());
  TORCH_CHECK(coef.scalar_type() == r.compute, op, ": coef must be ", r.compute, " (the compute dtype of ",
              r.latent, " latents), got ", coef.scalar_type());
  TORCH_CHECK(coef.is_contiguous(), op, ": coef must be contiguous");
  const bool has_ref = present(v_ref), has_ema = present(v_ema);
  at::Tensor grad = at::empty_like(v);
  const Tiling tl(r);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.latent, "rsm_fp_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t norm = static_cast<acc_t>(mean ? 1.0 / static_cast<double>(r.n) : 1.0);
    // `2.0 * norm` is a product of two Python floats in decomposed_fp.fp_bwd: formed in double.
    const acc_t two_norm = static_cast<acc_t>(2.0 * (mean ? 1.0 / static_cast<double>(r.n) : 1.0));
    // Per-row coefficients k0, k1, ke, kf (decomposed_fp.fp_bwd), once per row.
    std::vector<acc_t> k0(r.B), k1(r.B), ke(r.B), kf(r.B);
    const acc_t *gl = g_loss.data_ptr<acc_t>(), *gp = g_policy.data_ptr<acc_t>(), *gk = g_kl.data_ptr<acc_t>(),
                *ge = g_ema.data_ptr<acc_t>(), *pk = kl_coef.data_ptr<acc_t>(), *pe = ema_coef.data_ptr<acc_t>(),
                *pc = coef.data_ptr<acc_t>();
    for (int64_t i = 0; i < r.B; ++i) {
      const acc_t gP = gl[i] + gp[i];
      k0[i] = gP * pc[2 * i] * norm;
      k1[i] = gP * pc[2 * i + 1] * norm;
      ke[i] = two_norm * (gl[i] * pk[i] + gk[i]);
      kf[i] = two_norm * (gl[i] * pe[i] + ge[i]);
    }
    const Streams<scalar_t> s = streams<scalar_t>(v, v_old, xa, x0, v_ref, v_ema);
    const acc_t* pt = t.data_ptr<acc_t>();
    const acc_t b_ = static_cast<acc_t>(beta);
    scalar_t* pg = grad.data_ptr<scalar_t>();
    with_variant(kind, has_ref, has_ema, [&](auto K, auto R, auto E) {
      constexpr int kK = decltype(K)::value;
      constexpr bool kR = decltype(R)::value, kE = decltype(E)::value;
      for_each_chunk(tl, [&](int64_t, int64_t row, int64_t b, int64_t len) {
        fp_grad_chunk<kK, kR, kE>(s, b, pt[row], pt[row] * b_, k0[row], k1[row], ke[row], kf[row], len, pg + b);
      });
    });
  });
  return grad;
}

}  // namespace rsm_ops

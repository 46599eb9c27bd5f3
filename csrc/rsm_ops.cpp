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
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "rsm_ops.h"

namespace rsm_ops {
namespace {

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------
using OptTensor = c10::optional<at::Tensor>;  // None from Python

// The first latent tensor fixes B, n and the latent dtype.
struct Rows {
  int64_t B;
  int64_t n;
  at::ScalarType latent;   // dtype of the latent tensors
  at::ScalarType compute;  // dtype of the per-row vectors and of the arithmetic
};

Rows check_lead(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have shape [B, ...], got a 0-d tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": ",
              name, " must be float64, float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  const int64_t B = t.size(0);
  const int64_t n = B > 0 ? t.numel() / B : 0;
  TORCH_CHECK(B == 0 || n > 0, op, ": ", name, " has empty rows (shape ", t.sizes(), ")");
  return {B, n, st, st == at::kDouble ? at::kDouble : at::kFloat};
}

void check_latent(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                  const char* like_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ",
              like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name,
              " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_opt_latent(const char* op, const char* name, const OptTensor& t, const at::Tensor& like,
                      const char* like_name) {
  if (t.has_value() && t->defined()) check_latent(op, name, *t, like, like_name);
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// A per-row vector: contiguous [B] of the compute dtype (bool for `stochastic`).
void check_row(const char* op, const char* name, const at::Tensor& t, const Rows& r, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == r.B, op, ": ", name, " must have shape [", r.B, "], got ",
              t.sizes());
  if (dtype == at::kBool) {
    TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor, got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (the compute dtype of ", r.latent,
                " latents), got ", t.scalar_type());
  }
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// ---------------------------------------------------------------------------------------------
// Work decomposition: (row, chunk) items
// ---------------------------------------------------------------------------------------------
constexpr int64_t kChunk = 8192;          // elements per work item (a multiple of kLanes)
constexpr int64_t kLanes = 16;            // independent accumulators per row sum (SIMD lanes + ILP)
constexpr int64_t kMinParallel = 32768;   // elements below which a parallel region is not worth it

struct Tiling {
  int64_t B, n, per_row;  // per_row: chunks per row
  explicit Tiling(const Rows& r) : B(r.B), n(r.n), per_row(r.n > 0 ? (r.n + kChunk - 1) / kChunk : 0) {}
  int64_t items() const { return B * per_row; }
};

// Calls f(item, row, begin, len) for every work item, `begin` being the flat element offset.
template <class F>
void for_each_chunk(const Tiling& t, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kMinParallel / std::max<int64_t>(1, std::min(t.n, kChunk)));
  at::parallel_for(0, t.items(), grain, [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t row = it / t.per_row, c = it % t.per_row;
      const int64_t off = c * kChunk;
      f(it, row, row * t.n + off, std::min(kChunk, t.n - off));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Element conversions. c10's scalar bf16/fp16 conversions are correct but their branches keep
// the compiler from vectorising the loops; these are branch-free (selects only) and give the
// same bits: round-to-nearest-even, NaN -> quiet NaN, overflow -> inf, fp16 subnormals exact.
// ---------------------------------------------------------------------------------------------
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_from_f32(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round half to even
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;                    // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;   // exponent rebiased by +(127-15)
  const uint32_t inf_nan = (em << 13) | 0x7f800000u;
  // subnormal m * 2^-24: 0.5 + m 2^-24 is exact in float, and so is subtracting 0.5 (no float
  // subnormals involved, so this holds under flush-to-zero too)
  const uint32_t sub = bits_from_f32(f32_from_bits(0x3f000000u + em) - 0.5f);
  return f32_from_bits(sign | (em < 0x400u ? sub : (em >= 0x7c00u ? inf_nan : normal)));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = bits_from_f32(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;  // |f|
  // |f| < 2^-14 (fp16 subnormal range): adding 0.5 leaves the float an ulp of 2^-24, the fp16
  // subnormal step, so the FPU's own rounding gives the mantissa (0x400 = the smallest normal).
  const uint32_t sub = bits_from_f32(f32_from_bits(a) + 0.5f) - 0x3f000000u;
  const uint32_t r = a - 0x38000000u;  // exponent rebiased by -(127-15)
  const uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;  // round half to even
  uint32_t out = a < 0x38800000u ? sub : normal;
  out = a >= 0x477ff000u ? 0x7c00u : out;  // |f| >= 65520 rounds to inf
  out = a > 0x7f800000u ? 0x7e00u : out;   // NaN
  return static_cast<uint16_t>(sign | out);
}

// Element load as the accumulation type (a no-op for float/double).
template <class acc_t, class scalar_t>
inline acc_t ld(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}
template <>
inline float ld<float, c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  return bf16_to_f32(p[i].x);
}
template <>
inline float ld<float, c10::Half>(const c10::Half* p, int64_t i) {
  return f16_to_f32(p[i].x);
}

// Element store from the accumulation type.
template <class scalar_t, class acc_t>
inline void st(scalar_t* p, int64_t i, acc_t v) {
  p[i] = static_cast<scalar_t>(v);
}
template <>
inline void st<c10::BFloat16, float>(c10::BFloat16* p, int64_t i, float v) {
  p[i] = c10::BFloat16(f32_to_bf16(v), c10::BFloat16::from_bits());
}
template <>
inline void st<c10::Half, float>(c10::Half* p, int64_t i, float v) {
  p[i] = c10::Half(f32_to_f16(v), c10::Half::from_bits());
}

// Adds the kLanes accumulators of `acc` pairwise (a fixed order).
template <class acc_t>
inline acc_t fold_lanes(acc_t* acc) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// Sums the per-item partials of each row in chunk order: part[item * ns + k] -> out[row * ns + k].
template <class acc_t>
std::vector<acc_t> reduce_rows(const std::vector<acc_t>& part, const Tiling& t, int ns) {
  std::vector<acc_t> out(t.B * ns, acc_t(0));
  for (int64_t b = 0; b < t.B; ++b)
    for (int64_t c = 0; c < t.per_row; ++c)
      for (int k = 0; k < ns; ++k) out[b * ns + k] += part[(b * t.per_row + c) * ns + k];
  return out;
}

// Runs body(i, j) for i in [0, len) with j = i % kLanes the accumulator lane: full blocks of
// kLanes first (the inner loop is what the compiler vectorises), then the tail.
template <class Body>
inline void lane_loop(int64_t len, const Body& body) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) body(i + j, j);
  }
  for (int64_t j = 0; i + j < len; ++j) body(i + j, j);
}

at::TensorOptions opts(at::ScalarType t) { return at::TensorOptions().dtype(t).device(at::kCPU); }

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

  const auto o = opts(r.compute);
  at::Tensor loss = at::empty({r.B}, o), policy = at::empty({r.B}, o), kl = at::empty({r.B}, o),
             clipped = at::empty({r.B}, opts(at::kBool)), log_ratio = at::empty({r.B}, o),
             lin = at::empty({r.B}, o), d_lin = at::empty({r.B}, o), d_quad = at::empty({r.B}, o),
             d_kl = at::empty({r.B}, o);
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
  m.def("score_fwd", &rsm_ops::score_fwd, "score-regression loss per row", py::arg("s"), py::arg("s_ref"),
        py::arg("psi"), py::arg("s_old"), py::arg("c1"), py::arg("gamma"), py::arg("c2"), py::arg("mean"));
  m.def("score_bwd", &rsm_ops::score_bwd, "score-regression gradient w.r.t. s", py::arg("g_loss"), py::arg("s"),
        py::arg("s_ref"), py::arg("psi"), py::arg("s_old"), py::arg("c1"), py::arg("gamma"), py::arg("c2"),
        py::arg("mean"));
  m.def("step_fwd", &rsm_ops::step_fwd, "sampler step -> (x_next, log_prob)", py::arg("x"), py::arg("f"),
        py::arg("z"), py::arg("c_x"), py::arg("c_f"), py::arg("sigma"), py::arg("stochastic"), py::arg("mean"));
}

// Declarations of the C++ CPU fused RSM ops (csrc/rsm_ops.cpp, rsm_zo.cpp, rsm_fp.cpp, rsm_noise.cpp). Signatures,
// argument order and return conventions follow rsm_fast/ops/decomposed.py (decomposed_fp.py for fp_*); optional
// tensors are c10::optional.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace rsm_ops {

// -> (loss, policy, kl, clipped, log_ratio, lin, d_lin, d_quad, d_kl), each [B]; clipped is bool.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
zo_fwd(const at::Tensor& f_theta, const at::Tensor& f_old, const at::Tensor& z, const c10::optional<at::Tensor>& f_ref,
       const at::Tensor& adv, const at::Tensor& omega, const at::Tensor& sigma, const at::Tensor& dt,
       const at::Tensor& stochastic, const at::Tensor& row_weight, const at::Tensor& kl_coef,
       const at::Tensor& omega_train, int64_t form, int64_t reweight, double clip_eps, double tempflow_scale,
       bool kl_dt_weight, bool mean);

// Gradient of sum(g_loss loss + g_policy policy + g_kl kl) w.r.t. f_theta, in f_theta's dtype.
at::Tensor zo_bwd(const at::Tensor& g_loss, const at::Tensor& g_policy, const at::Tensor& g_kl,
                  const at::Tensor& f_theta, const at::Tensor& f_old, const at::Tensor& z,
                  const c10::optional<at::Tensor>& f_ref, const at::Tensor& omega, const at::Tensor& d_lin,
                  const at::Tensor& d_quad, const at::Tensor& d_kl, bool mean);

// Forward-process loss (NFT kind 0 / AWM kind 1) -> (loss, policy, kl, ema_kl, aux [B, 4], clipped bool, coef [B, 2]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fp_fwd(const at::Tensor& v, const c10::optional<at::Tensor>& v_old, const at::Tensor& xa, const at::Tensor& x0,
       const c10::optional<at::Tensor>& v_ref, const c10::optional<at::Tensor>& v_ema, const at::Tensor& t,
       const at::Tensor& w, const c10::optional<at::Tensor>& logp_old, const at::Tensor& kl_coef,
       const at::Tensor& ema_coef, int64_t kind, double beta, double scale, int64_t weighting, double power,
       double clip, bool mean);

// Gradient of sum(g_loss loss + g_policy policy + g_kl kl + g_ema ema_kl) w.r.t. v, in v's dtype.
at::Tensor fp_bwd(const at::Tensor& g_loss, const at::Tensor& g_policy, const at::Tensor& g_kl,
                  const at::Tensor& g_ema, const at::Tensor& v, const c10::optional<at::Tensor>& v_old,
                  const at::Tensor& xa, const at::Tensor& x0, const c10::optional<at::Tensor>& v_ref,
                  const c10::optional<at::Tensor>& v_ema, const at::Tensor& t, const at::Tensor& kl_coef,
                  const at::Tensor& ema_coef, const at::Tensor& coef, int64_t kind, double beta, bool mean);

// Per-row C1 norm (sum t^2 + C2 sum o^2), t = s - s_ref - gamma psi, o = s - s_old.
at::Tensor score_fwd(const at::Tensor& s, const at::Tensor& s_ref, const at::Tensor& psi,
                     const c10::optional<at::Tensor>& s_old, const at::Tensor& c1, const at::Tensor& gamma,
                     const at::Tensor& c2, bool mean);

// 2 g C1 norm (t + C2 o) in s's dtype.
at::Tensor score_bwd(const at::Tensor& g_loss, const at::Tensor& s, const at::Tensor& s_ref, const at::Tensor& psi,
                     const c10::optional<at::Tensor>& s_old, const at::Tensor& c1, const at::Tensor& gamma,
                     const at::Tensor& c2, bool mean);

// -> (x_next in x's dtype, log_prob [B] in the compute dtype).
std::tuple<at::Tensor, at::Tensor> step_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& z,
                                            const at::Tensor& c_x, const at::Tensor& c_f, const at::Tensor& sigma,
                                            const at::Tensor& stochastic, bool mean);

// Counter-based Gaussian noise (csrc/rsm_noise.cpp; contract in rsm_fast/ops/philox.py): elements
// [4 block0, 4 block0 + numel) of each row's Philox-4x32-10 stream, counter (block, row key lo32,
// row key hi32, step), key = seed's words; steps [R] int64 (used mod 2^32) or None -> `step` for
// every row. -> [R, numel] normals of `dtype` (fp16/bf16/fp32 computed in float, fp64 in double).
at::Tensor philox_normal(const at::Tensor& row_keys, const c10::optional<at::Tensor>& steps, int64_t step,
                         uint64_t seed, int64_t block0, int64_t numel, at::ScalarType dtype);

// The raw uint32 words of the same window as int64 [R, numel] (element e = word e % 4 of its block).
at::Tensor philox_words(const at::Tensor& row_keys, const c10::optional<at::Tensor>& steps, int64_t step,
                        uint64_t seed, int64_t block0, int64_t numel);

}  // namespace rsm_ops

// Internal building blocks shared by the C++ CPU ops (rsm_ops.cpp, rsm_zo.cpp): argument checks,
// the (row, chunk) work decomposition with fixed-order partial sums, branch-free bf16/fp16
// conversions and the lane loop the compiler vectorises. Not part of the extension's interface.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace rsm_ops {
namespace detail {

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

inline Rows check_lead(const char* op, const char* name, const at::Tensor& t) {
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

inline void check_latent(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                  const char* like_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ",
              like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name,
              " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_opt_latent(const char* op, const char* name, const OptTensor& t, const at::Tensor& like,
                      const char* like_name) {
  if (t.has_value() && t->defined()) check_latent(op, name, *t, like, like_name);
}

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// A per-row vector: contiguous [B] of the compute dtype (bool for `stochastic`).
inline void check_row(const char* op, const char* name, const at::Tensor& t, const Rows& r, at::ScalarType dtype) {
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
inline void for_each_chunk(const Tiling& t, const F& f) {
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

inline at::TensorOptions opts(at::ScalarType t) { return at::TensorOptions().dtype(t).device(at::kCPU); }

// One allocation for a forward's per-row outputs: a [K, B] block of the compute dtype whose rows
// (and row ranges) are handed out as separate tensors over its storage (rsm_fast/ops/library.py,
// "One output block"). They are aliases made without the dispatcher: a narrow + view per output
// costs ~0.5 us each on CPU, more than the nine allocations the block replaces. Not autograd views
// (each has its own version counter); the ranges are disjoint, so nothing written through one is
// seen through another.
struct RowBlock {
  at::Tensor flat;
  int64_t B;
  RowBlock(int64_t K, int64_t B_, at::ScalarType t) : flat(at::empty({K * B_}, opts(t))), B(B_) {}
  at::Tensor alias(int64_t byte_offset, at::IntArrayRef sizes, at::ScalarType dtype) const {
    const caffe2::TypeMeta meta = c10::scalarTypeToTypeMeta(dtype);
    at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(flat.storage()),
                                                             flat.key_set(), meta);
    c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    impl->set_storage_offset(byte_offset / static_cast<int64_t>(meta.itemsize()));
    impl->set_sizes_contiguous(sizes);
    return t;
  }
  // rows [k, k + n) as a [B] tensor (n == 1) or a row-major [B, n] tensor
  at::Tensor rows(int64_t k, int64_t n = 1) const {
    const int64_t off = k * B * static_cast<int64_t>(flat.element_size());
    return n == 1 ? alias(off, {B}, flat.scalar_type()) : alias(off, {B, n}, flat.scalar_type());
  }
  // a bool [B] output stored in the first B bytes of row k
  at::Tensor bools(int64_t k) const {
    return alias(k * B * static_cast<int64_t>(flat.element_size()), {B}, at::kBool);
  }
};

}  // namespace detail
}  // namespace rsm_ops

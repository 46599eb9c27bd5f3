// C++ CPU kernel of the counter-based Gaussian noise of rsm_fast/engine/noise.py: Philox-4x32-10
// words and Box-Muller normals in one pass, written straight into the output dtype. The stream
// layout and the backend contract (arguments, windows, dtypes) are documented in
// rsm_fast/ops/philox.py, whose plain-torch code is the reference this kernel is tested against.
//
//   * The uint32 words are bit-identical to the reference (uint32/uint64 arithmetic, the 32x32->64
//     product's halves give Philox's mulhi/mullo).
//   * Box-Muller uses the reference's uniform mapping and operation order, with std::log,
//     std::sqrt, std::cos, std::sin in float (float64 requests: double). The normals therefore
//     agree with the reference (torch's vectorised libm) up to libm rounding, a few ulp.
//   * Every element is a pure function of (seed, row key, step, element index), computed by the
//     same scalar code wherever it lies in the output (no vector-width tails with a different
//     libm), so results are bitwise identical for any thread count, row order or chunking.
//   * Work items are (row, range of kItemBlocks Philox blocks); at::parallel_for gets a grain that
//     depends on the row length only, so tiny requests run inline on the calling thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "rsm_ops.h"
#include "rsm_ops_detail.h"

namespace rsm_ops {
using namespace detail;
namespace {

// Philox-4x32 constants, from Salmon, Moraes, Dror and Shaw, "Parallel Random Numbers: As Easy as
// 1, 2, 3", SC'11, and Random123's philox.h: round multipliers M0, M1 and Weyl key increments
// W0 = 0x9E3779B9 (golden ratio), W1 = 0xBB67AE85 (sqrt(3) - 1). Ten rounds (Philox-4x32-10).
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr double kTwoPi = 6.283185307179586476925286766559;  // 2 pi (as Python's 2 * math.pi)

constexpr int64_t kTile = 64;            // Philox blocks computed together (a loop the compiler vectorises)
constexpr int64_t kItemBlocks = 1024;    // Philox blocks per work item (4096 outputs)
constexpr int64_t kMinTaskElems = 8192;  // outputs below which a parallel task is not worth it
constexpr uint64_t kMaxBlocks = uint64_t(1) << 32;

struct RoundKeys {
  uint32_t k0[kRounds], k1[kRounds];
  explicit RoundKeys(uint64_t seed) {
    uint32_t a = uint32_t(seed), b = uint32_t(seed >> 32);
    for (int r = 0; r < kRounds; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += kW0;  // mod 2^32
      b += kW1;
    }
  }
};

// The words of blocks b0 + [0, n) (n <= kTile) under counter (b, c1, c2, c3): w[j][i] = word j of
// block b0 + i. One round (Salmon et al., Fig. 2):
//   (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)).
inline void philox_tile(uint32_t b0, int64_t n, uint32_t c1, uint32_t c2, uint32_t c3, const RoundKeys& key,
                        uint32_t (*w)[kTile]) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t x0 = b0 + uint32_t(i), x1 = c1, x2 = c2, x3 = c3;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t p0 = uint64_t(kM0) * x0;
      const uint64_t p1 = uint64_t(kM1) * x2;
      const uint32_t n0 = uint32_t(p1 >> 32) ^ x1 ^ key.k0[r];
      const uint32_t n2 = uint32_t(p0 >> 32) ^ x3 ^ key.k1[r];
      x0 = n0;
      x1 = uint32_t(p1);
      x2 = n2;
      x3 = uint32_t(p0);
    }
    w[0][i] = x0;
    w[1][i] = x1;
    w[2][i] = x2;
    w[3][i] = x3;
  }
}

// Box-Muller on one word pair (radius word a, angle word t), as in rsm_fast/ops/philox.py.
// float: u = ((a >> 8) + 1) 2^-24 in (0, 1], v = (t >> 8) 2^-24; both exact in float.
inline void box_muller(uint32_t a, uint32_t t, float* z) {
  // 2 pi 2^-24 rounded to float, as torch rounds the Python scalar of the reference's mul_
  const float angle_scale = static_cast<float>(kTwoPi * 0x1p-24);
  const float u = static_cast<float>((a >> 8) + 1u) * 0x1p-24f;
  const float r = std::sqrt(std::log(u) * -2.0f);
  const float th = static_cast<float>(t >> 8) * angle_scale;
  z[0] = std::cos(th) * r;
  z[1] = std::sin(th) * r;
}
// double: u = (a + 1/2) 2^-32 in (0, 1), v = t 2^-32; both exact in double.
inline void box_muller(uint32_t a, uint32_t t, double* z) {
  const double angle_scale = kTwoPi * 0x1p-32;
  const double u = (static_cast<double>(a) + 0.5) * 0x1p-32;
  const double r = std::sqrt(std::log(u) * -2.0);
  const double th = static_cast<double>(t) * angle_scale;
  z[0] = std::cos(th) * r;
  z[1] = std::sin(th) * r;
}

// Which values a work item writes: the words themselves (int64) or normals in scalar_t.
struct Words {};

template <class scalar_t>
inline void emit_block(const uint32_t (*w)[kTile], int64_t i, int64_t count, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;  // float for bf16/fp16/float, double for double
  acc_t z[4];
  box_muller(w[0][i], w[1][i], z);
  box_muller(w[2][i], w[3][i], z + 2);
  for (int64_t j = 0; j < count; ++j) st(out, j, z[j]);
}

struct Stream {
  const int64_t* keys;
  const int64_t* steps;  // nullptr: every row uses `step`
  uint32_t step;
  uint64_t block0;
  int64_t numel;
};

// Runs every (row, block range) work item; `Out` is Words (int64 output) or the normals' dtype.
template <class Out, class scalar_t>
void run(const Stream& s, const RoundKeys& key, int64_t R, scalar_t* out) {
  const int64_t n_blocks = (s.numel + 3) / 4;
  const int64_t per_row = (n_blocks + kItemBlocks - 1) / kItemBlocks;
  const int64_t grain = std::max<int64_t>(1, kMinTaskElems / (4 * std::min(n_blocks, kItemBlocks)));
  at::parallel_for(0, R * per_row, grain, [&](int64_t lo, int64_t hi) {
    uint32_t w[4][kTile];
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t row = it / per_row;
      const int64_t first = (it % per_row) * kItemBlocks;               // first block of the item, in the window
      const int64_t last = std::min(n_blocks, first + kItemBlocks);
      const uint64_t key_bits = static_cast<uint64_t>(s.keys[row]);     // two's complement words
      const uint32_t c1 = uint32_t(key_bits), c2 = uint32_t(key_bits >> 32);
      const uint32_t c3 = s.steps ? uint32_t(static_cast<uint64_t>(s.steps[row])) : s.step;
      scalar_t* orow = out + row * s.numel;
      for (int64_t b = first; b < last; b += kTile) {
        const int64_t n = std::min(kTile, last - b);
        philox_tile(uint32_t(s.block0 + uint64_t(b)), n, c1, c2, c3, key, w);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t e = 4 * (b + i);                               // first element of the block
          const int64_t count = std::min<int64_t>(4, s.numel - e);
          if constexpr (std::is_same<Out, Words>::value) {
            for (int64_t j = 0; j < count; ++j) orow[e + j] = static_cast<int64_t>(w[j][i]);
          } else {
            emit_block(w, i, count, orow + e);
          }
        }
      }
    }
  });
}

Stream check_stream(const char* op, const at::Tensor& row_keys, const c10::optional<at::Tensor>& steps,
                    int64_t step, int64_t block0, int64_t numel) {
  TORCH_CHECK(row_keys.device().is_cpu(), op, ": row_keys must be a CPU tensor, got ", row_keys.device());
  TORCH_CHECK(row_keys.dim() == 1 && row_keys.scalar_type() == at::kLong && row_keys.is_contiguous(), op,
              ": row_keys must be a contiguous int64 tensor [R], got ", row_keys.scalar_type(), " ",
              row_keys.sizes());
  const bool has_steps = steps.has_value() && steps->defined();
  if (has_steps) {
    TORCH_CHECK(steps->device().is_cpu(), op, ": steps must be a CPU tensor, got ", steps->device());
    TORCH_CHECK(steps->dim() == 1 && steps->size(0) == row_keys.size(0) && steps->scalar_type() == at::kLong &&
                    steps->is_contiguous(),
                op, ": steps must be a contiguous int64 tensor [", row_keys.size(0), "], got ", steps->scalar_type(),
                " ", steps->sizes());
  } else {
    TORCH_CHECK(step >= 0 && step <= int64_t(0xFFFFFFFF), op, ": step ", step, " outside [0, 2^32)");
  }
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  TORCH_CHECK(block0 >= 0 && uint64_t(block0) + uint64_t((numel + 3) / 4) <= kMaxBlocks, op, ": blocks [", block0,
              ", ", block0, " + ceil(", numel, " / 4)) exceed the 2^32 counter range");
  return {row_keys.data_ptr<int64_t>(), has_steps ? steps->data_ptr<int64_t>() : nullptr, uint32_t(step),
          uint64_t(block0), numel};
}

}  // namespace

at::Tensor philox_normal(const at::Tensor& row_keys, const c10::optional<at::Tensor>& steps, int64_t step,
                         uint64_t seed, int64_t block0, int64_t numel, at::ScalarType dtype) {
  const char* op = "rsm_fast philox_normal";
  const Stream s = check_stream(op, row_keys, steps, step, block0, numel);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float64, float32, bfloat16 or float16, got ", dtype);
  const int64_t R = row_keys.size(0);
  at::Tensor out = at::empty({R, numel}, opts(dtype));
  if (R == 0 || numel == 0) return out;
  const RoundKeys key(seed);
  switch (dtype) {
    case at::kDouble: run<double>(s, key, R, out.data_ptr<double>()); break;
    case at::kFloat: run<float>(s, key, R, out.data_ptr<float>()); break;
    case at::kBFloat16: run<c10::BFloat16>(s, key, R, out.data_ptr<c10::BFloat16>()); break;
    default: run<c10::Half>(s, key, R, out.data_ptr<c10::Half>()); break;
  }
  return out;
}

at::Tensor philox_words(const at::Tensor& row_keys, const c10::optional<at::Tensor>& steps, int64_t step,
                        uint64_t seed, int64_t block0, int64_t numel) {
  const Stream s = check_stream("rsm_fast philox_words", row_keys, steps, step, block0, numel);
  const int64_t R = row_keys.size(0);
  at::Tensor out = at::empty({R, numel}, opts(at::kLong));
  if (R == 0 || numel == 0) return out;
  run<Words>(s, RoundKeys(seed), R, out.data_ptr<int64_t>());
  return out;
}

}  // namespace rsm_ops

// AWQ INT4 x activation GEMM in plain C++ for any CPU (the `portable` backend).
//
// y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k/G]) * s[n, k/G]  (+ bias[n])
//
// No intrinsics: the inner loop is written with GCC/Clang vector extensions
// (fixed-width vectors with element-wise + and *), which the compiler lowers to
// whatever this CPU has (NEON on ARM, SSE/AVX2/AVX-512 on x86). It is compiled
// with -march=native / -mcpu=native (kernels.cpu.build), so one source serves
// every CPU that has no hand-written path.
//
// The arithmetic is the other CPU kernels' (awq_gemm.cpp, awq_gemm_avx2.cpp), so
// their error bound holds: activations are quantized to int8 per (row, group),
// a group's integer dot sum_k a_q[k] * (q[k] - z) is exact in int32, and each
// group is scaled once in fp32: y += float(dot) * (s_w * s_a).
//
// The integer dot is an outer product. A tile holds 64 output channels; for each
// k, 32 bytes carry them as nibbles (byte i: channel i low, channel 32 + i high).
// Per k the tile's nibbles become two vectors of 32 int16 (q - 8, in [-8, 7]),
// and each activation row adds a_q[k] * that to its own int16 accumulators:
// |a_q * (q - 8)| <= 127 * 8 = 1016, so kChunk = 32 k stay below 32767 before
// they are widened to int32. The zero point is corrected once per group and
// row, exactly: sum a_q (q - z) = sum a_q (q - 8) + (8 - z) * sum a_q.
//
// From 2 * kRows rows on (tile_panel), a tile's nibbles are decoded once per chunk
// into an L1 buffer shared by a panel of up to 32 rows, so the decode and the weight
// reads are paid once per panel (two hot-cache A/Bs: M = 16 +8% / +12%, M = 64 +3% / +18%).
//
// Layout (kernels.repack_for_portable): wq [tiles][K][32] bytes; ws fp32 and
// wz uint8, both [tiles][NG][64]. N is padded to 64 with zero channels.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "awq_common.h"

namespace {

constexpr int64_t kTileN = 64;   // output channels per tile
constexpr int64_t kTileBytes = kTileN / 2;  // bytes per k in a tile
constexpr int64_t kChunk = 32;   // k accumulated in int16 before widening (see top)

// Activation rows sharing one pass over a tile's k: each needs two int16
// accumulator vectors of 64 bytes, so the register file sets it.
#if defined(__AVX512BW__)
constexpr int kRows = 8;  // 32 zmm registers: 16 accumulators (8 was faster than 4 or 6 here)
#else
constexpr int kRows = 2;  // 16 ymm (AVX2) or 32 NEON q registers: 4 accumulators of 2-4 registers
#endif

typedef int16_t v32i16 __attribute__((vector_size(64)));
typedef int16_t v16i16 __attribute__((vector_size(32)));
typedef int32_t v16i32 __attribute__((vector_size(64)));
typedef uint8_t v32u8 __attribute__((vector_size(32)));

struct Problem {
  int64_t M, N, K, G, NG, tiles;
};


// int8 activations per (row, group), widened to int16 so that the inner loop
// broadcasts them straight from memory: a_q = round_half_even(x * (127 / amax)),
// s_a = amax / 127, and the group's sum of a_q for the zero point.
template <typename scalar_t>
void quantize_rows(const scalar_t* x, const Problem& p, int64_t m0, int64_t m1, int16_t* aq, float* sa,
                   int32_t* suma) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t g = 0; g < p.NG; ++g)
      sa[m * p.NG + g] =
          awq_cpu::quantize_group(x + m * p.K + g * p.G, p.G, aq + m * p.K + g * p.G, suma + m * p.NG + g);
}

inline void widen_add(int32_t* dst, v32i16 v) {
  v16i16 h[2];
  std::memcpy(h, &v, sizeof(v));
  for (int half = 0; half < 2; ++half) {
    v16i32 acc;
    std::memcpy(&acc, dst + 16 * half, sizeof(acc));
    acc += __builtin_convertvector(h[half], v16i32);
    std::memcpy(dst + 16 * half, &acc, sizeof(acc));
  }
}

// One k of a tile: its 32 bytes as q - 8 in int16, channels 0..31 (low nibbles) and 32..63 (high).
inline void decode_k(const uint8_t* w, v32i16& lo, v32i16& hi) {
  const v32u8 low4 = (v32u8){} + 0x0F;
  v32u8 b;
  std::memcpy(&b, w, sizeof(b));
  lo = __builtin_convertvector(b & low4, v32i16) - 8;
  hi = __builtin_convertvector(b >> 4, v32i16) - 8;
}

// Group g's end for `rows` rows from m0: the exact zero point, then one fp32 product.
// iacc: the group's int32 dots [rows][64]; acc: the fp32 results [rows][64].
inline void fold_group(const int32_t* __restrict iacc, int64_t rows, const float* __restrict ws,
                       const uint8_t* __restrict wz, const float* __restrict sa, const int32_t* __restrict suma,
                       const Problem& p, int64_t m0, int64_t g, float* __restrict acc) {
  const float* s = ws + g * kTileN;
  const uint8_t* z = wz + g * kTileN;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t ag = (m0 + r) * p.NG + g;
    const int32_t asum = suma[ag];
    const float s_a = sa[ag];
    float* y = acc + r * kTileN;
    const int32_t* ia = iacc + r * kTileN;
    for (int64_t j = 0; j < kTileN; ++j) {
      const int32_t dot = ia[j] + (8 - static_cast<int32_t>(z[j])) * asum;
      y[j] = std::fma(static_cast<float>(dot), s[j] * s_a, y[j]);
    }
  }
}

// ROWS activation rows (from m0) x one tile of 64 channels, over all of K; the
// fp32 results go to acc [ROWS][64].
template <int ROWS>
void tile_rows(const uint8_t* __restrict wq, const float* __restrict ws, const uint8_t* __restrict wz,
               const int16_t* __restrict aq, const float* __restrict sa, const int32_t* __restrict suma,
               const Problem& p, int64_t m0, float* __restrict acc) {
  alignas(64) int32_t iacc[ROWS][kTileN];
  for (int r = 0; r < ROWS; ++r)
    for (int64_t j = 0; j < kTileN; ++j) acc[r * kTileN + j] = 0.f;
  for (int64_t g = 0; g < p.NG; ++g) {
    std::memset(iacc, 0, sizeof(iacc));
    for (int64_t c0 = 0; c0 < p.G; c0 += kChunk) {
      const int64_t c1 = std::min(p.G, c0 + kChunk);
      v32i16 lo_acc[ROWS], hi_acc[ROWS];
      for (int r = 0; r < ROWS; ++r) lo_acc[r] = hi_acc[r] = (v32i16){};
      const int64_t k0 = g * p.G;
      for (int64_t k = k0 + c0; k < k0 + c1; ++k) {
        v32i16 lo, hi;
        decode_k(wq + k * kTileBytes, lo, hi);
        for (int r = 0; r < ROWS; ++r) {
          const int16_t a = aq[(m0 + r) * p.K + k];
          lo_acc[r] += lo * a;
          hi_acc[r] += hi * a;
        }
      }
      for (int r = 0; r < ROWS; ++r) {
        widen_add(iacc[r], lo_acc[r]);
        widen_add(iacc[r] + 32, hi_acc[r]);
      }
    }
    fold_group(&iacc[0][0], ROWS, ws, wz, sa, suma, p, m0, g, acc);
  }
}

// Many rows: a tile's nibbles are decoded once per chunk of kChunk k into an L1 buffer
// of int16 (q - 8, channels 0..63 per k), and every row of a panel of up to kPanelRows
// rows multiplies from there, so the decode is paid once per panel instead of once
// per kRows rows, and the tile's weights are read from memory once per panel.
constexpr int64_t kPanelRows = 32;     // rows sharing one decode (acc and iacc: 8 KiB each)
constexpr int64_t kPanelMinRows = 2 * kRows;  // from here on the decoded panel pays off

// ROWS rows from row m0 x the tile's 64 channels over nk decoded k (from k): iacc += the dots.
template <int ROWS>
inline void panel_rows(const int16_t* __restrict dec, int64_t nk, const int16_t* __restrict aq, const Problem& p,
                       int64_t m0, int64_t k, int32_t* __restrict iacc) {
  v32i16 lo_acc[ROWS], hi_acc[ROWS];
  for (int r = 0; r < ROWS; ++r) lo_acc[r] = hi_acc[r] = (v32i16){};
  for (int64_t i = 0; i < nk; ++i) {
    v32i16 lo, hi;
    std::memcpy(&lo, dec + i * kTileN, sizeof(lo));
    std::memcpy(&hi, dec + i * kTileN + 32, sizeof(hi));
    for (int r = 0; r < ROWS; ++r) {
      const int16_t a = aq[(m0 + r) * p.K + k + i];
      lo_acc[r] += lo * a;
      hi_acc[r] += hi * a;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    widen_add(iacc + r * kTileN, lo_acc[r]);
    widen_add(iacc + r * kTileN + 32, hi_acc[r]);
  }
}

// `rows` rows from m0 (rows <= kPanelRows) x one tile, over all of K; fp32 results to acc [rows][64].
void tile_panel(const uint8_t* __restrict wq, const float* __restrict ws, const uint8_t* __restrict wz,
                const int16_t* __restrict aq, const float* __restrict sa, const int32_t* __restrict suma,
                const Problem& p, int64_t m0, int64_t rows, float* __restrict acc, int32_t* __restrict iacc,
                int16_t* __restrict dec) {
  std::fill(acc, acc + rows * kTileN, 0.f);
  for (int64_t g = 0; g < p.NG; ++g) {
    std::fill(iacc, iacc + rows * kTileN, 0);
    const int64_t k0 = g * p.G;
    for (int64_t c0 = 0; c0 < p.G; c0 += kChunk) {
      const int64_t nk = std::min(p.G, c0 + kChunk) - c0;
      for (int64_t i = 0; i < nk; ++i) {
        v32i16 lo, hi;
        decode_k(wq + (k0 + c0 + i) * kTileBytes, lo, hi);
        std::memcpy(dec + i * kTileN, &lo, sizeof(lo));
        std::memcpy(dec + i * kTileN + 32, &hi, sizeof(hi));
      }
      int64_t r = 0;
      for (; r + kRows <= rows; r += kRows) panel_rows<kRows>(dec, nk, aq, p, m0 + r, k0 + c0, iacc + r * kTileN);
      for (; r < rows; ++r) panel_rows<1>(dec, nk, aq, p, m0 + r, k0 + c0, iacc + r * kTileN);
    }
    fold_group(iacc, rows, ws, wz, sa, suma, p, m0, g, acc);
  }
}

template <typename scalar_t>
void store_tile(const float* acc, const float* bias, const Problem& p, int64_t m0, int64_t rows, int64_t n0,
                scalar_t* y) {
  const int64_t n_end = std::min(p.N, n0 + kTileN);
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* out = y + (m0 + r) * p.N;
    for (int64_t n = n0; n < n_end; ++n)
      out[n] = static_cast<scalar_t>(acc[r * kTileN + n - n0] + (bias != nullptr ? bias[n] : 0.f));
  }
}

template <typename scalar_t>
void run_gemm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, const at::Tensor& wz,
              const float* bias, const Problem& p, at::Tensor& y) {
  auto aq = at::empty({p.M, p.K}, x.options().dtype(at::kShort));
  auto sa = at::empty({p.M, p.NG}, x.options().dtype(at::kFloat));
  auto suma = at::empty({p.M, p.NG}, x.options().dtype(at::kInt));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  int16_t* aqp = aq.data_ptr<int16_t>();
  float* sap = sa.data_ptr<float>();
  int32_t* sump = suma.data_ptr<int32_t>();
  const int64_t row_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.K, 1));
  at::parallel_for(0, p.M, row_grain, [&](int64_t m0, int64_t m1) { quantize_rows(xp, p, m0, m1, aqp, sap, sump); });

  const uint8_t* wqp = wq.data_ptr<uint8_t>();
  const float* wsp = ws.data_ptr<float>();
  const uint8_t* wzp = wz.data_ptr<uint8_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  // Tiles are handed out one at a time (the machine may be shared); a tile's
  // weights (K * 32 bytes) stay in L2 while every row block passes over them.
  std::atomic<int64_t> next_tile{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.tiles));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    alignas(64) float acc[kPanelRows * kTileN];
    alignas(64) int32_t iacc[kPanelRows * kTileN];
    alignas(64) int16_t dec[kChunk * kTileN];
    for (int64_t t; (t = next_tile.fetch_add(1, std::memory_order_relaxed)) < p.tiles;) {
      const uint8_t* tq = wqp + t * p.K * kTileBytes;
      const float* ts = wsp + t * p.NG * kTileN;
      const uint8_t* tz = wzp + t * p.NG * kTileN;
      if (p.M >= kPanelMinRows) {
        for (int64_t m0 = 0; m0 < p.M; m0 += kPanelRows) {
          const int64_t rows = std::min(kPanelRows, p.M - m0);
          tile_panel(tq, ts, tz, aqp, sap, sump, p, m0, rows, acc, iacc, dec);
          store_tile(acc, bias, p, m0, rows, t * kTileN, yp);
        }
        continue;
      }
      int64_t m0 = 0;
      for (; m0 + kRows <= p.M; m0 += kRows) {
        tile_rows<kRows>(tq, ts, tz, aqp, sap, sump, p, m0, acc);
        store_tile(acc, bias, p, m0, kRows, t * kTileN, yp);
      }
      for (; m0 < p.M; ++m0) {
        tile_rows<1>(tq, ts, tz, aqp, sap, sump, p, m0, acc);
        store_tile(acc, bias, p, m0, 1, t * kTileN, yp);
      }
    }
  });
}

}  // namespace

// x: [M, K] fp32/bf16/fp16, contiguous. wq/ws/wz: the repacked weight (kernels.repack_for_portable).
// bias: optional [N]. Returns y: [M, N] in x's dtype.
at::Tensor awq_gemm_portable(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, const at::Tensor& wz,
                             int64_t group_size, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  const int64_t K = awq_cpu::check_gemm_args(x, wq, ws, wz, at::kFloat, "fp32", group_size);
  Problem p{x.size(0), out_features, K, group_size, K / group_size, (out_features + kTileN - 1) / kTileN};
  TORCH_CHECK(wq.numel() == p.tiles * p.K * kTileBytes, "wq size does not match K, N");
  awq_cpu::check_meta_size(ws, wz, p.tiles * p.NG * kTileN);
  at::Tensor bias_f;
  const float* bias_ptr = awq_cpu::bias_as_float(bias, out_features, bias_f);
  at::Tensor y = at::empty({p.M, p.N}, x.options());
  if (p.M == 0) return y;
  awq_cpu::dispatch_activation_dtype(x.scalar_type(), [&](auto zero) {
    run_gemm<decltype(zero)>(x, wq, ws, wz, bias_ptr, p, y);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("awq_gemm_portable", &awq_gemm_portable, "AWQ int4 GEMM in generic C++ (vector extensions)",
        py::arg("x"), py::arg("wq"), py::arg("ws"), py::arg("wz"), py::arg("group_size"),
        py::arg("out_features"), py::arg("bias") = py::none());
}

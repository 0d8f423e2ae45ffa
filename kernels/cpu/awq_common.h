// What the three CPU kernels (awq_gemm.cpp, awq_gemm_avx2.cpp,
// awq_gemm_portable.cpp) share word for word: reading an activation as fp32,
// the scalar int8 quantization of one activation group,
// the two x86 kernels' tiled problem sizes, the entry points' argument checks,
// the optional bias as fp32, and the switch over the activation dtype. No arithmetic or layout lives here; each kernel
// keeps its own tiles, packing and inner loops.
//
// Each kernel is its own extension (its own translation unit), so this header
// is compiled into all three; kernels.cpu.build hashes it into every build key.

#pragma once

#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace awq_cpu {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// One group of G activations to int8 values (stored as q_t: int8 or int16), in
// scalar code: a_q = round_half_even(x * (127 / amax)) (std::nearbyint in the
// default rounding mode), |a_q| <= 127. Writes the sum of a_q (for the exact
// zero-point correction) and returns s_a = amax / 127. The SIMD paths compute
// the same values in registers.
template <typename scalar_t, typename q_t>
inline float quantize_group(const scalar_t* xg, int64_t G, q_t* qg, int32_t* sum_out) {
  float amax = 0.f;
  for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::fabs(to_float(xg[i])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < G; ++i) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(to_float(xg[i]) * inv));
    qg[i] = static_cast<q_t>(q);
    sum += q;
  }
  *sum_out = sum;
  return amax / 127.f;
}

// The problem as the two x86 kernels (awq_gemm.cpp, awq_gemm_avx2.cpp) tile it; they share one
// weight layout: each group of G k padded to Gp (G rounded up to 8), tiles of `tile_n` output
// channels, blocks of `block_tiles` tiles. (awq_gemm_portable.cpp has its own layout.)
struct TiledProblem {
  int64_t M, N, K, G, Gp, NG, Kp, tiles, blocks;
};

inline TiledProblem make_tiled_problem(int64_t M, int64_t N, int64_t K, int64_t G, int64_t tile_n,
                                       int64_t block_tiles) {
  TiledProblem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.G = G;
  p.Gp = (G + 7) / 8 * 8;
  p.NG = K / G;
  p.Kp = p.NG * p.Gp;
  p.tiles = (N + tile_n - 1) / tile_n;
  p.blocks = (p.tiles + block_tiles - 1) / block_tiles;
  return p;
}

// x: contiguous [M, K]; wq: contiguous uint8; ws: contiguous `ws_dtype`
// (`ws_name` in the message); wz: contiguous uint8; group_size divides K.
// Returns K.
inline int64_t check_gemm_args(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws,
                               const at::Tensor& wz, at::ScalarType ws_dtype, const char* ws_name,
                               int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(wq.scalar_type() == at::kByte && wq.is_contiguous(), "wq must be contiguous uint8");
  TORCH_CHECK(ws.scalar_type() == ws_dtype && ws.is_contiguous(), "ws must be contiguous ", ws_name);
  TORCH_CHECK(wz.scalar_type() == at::kByte && wz.is_contiguous(), "wz must be contiguous uint8");
  const int64_t K = x.size(1);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "group_size must divide K");
  return K;
}

// Scales and zeros hold one entry each per (padded channel, group): `expected`.
inline void check_meta_size(const at::Tensor& ws, const at::Tensor& wz, int64_t expected) {
  TORCH_CHECK(ws.numel() == expected && wz.numel() == ws.numel(),
              "scales/zeros size does not match K, N, group_size");
}

// The optional bias as contiguous fp32 [out_features], kept alive in `holder`;
// nullptr when there is none.
inline const float* bias_as_float(const c10::optional<at::Tensor>& bias, int64_t out_features,
                                  at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  holder = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(holder.numel() == out_features, "bias must have out_features elements");
  return holder.data_ptr<float>();
}

// Calls f(scalar_t{}) for the activation dtype: fp32, bf16 or fp16.
template <typename F>
void dispatch_activation_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "x must be fp32, bf16 or fp16, got ", dtype);
  }
}

}  // namespace awq_cpu

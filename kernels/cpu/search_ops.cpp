// Fused element-wise steps of the quantizer's clip search (awq_plugin.algorithm.clip).
//
// Each clip candidate clamps every weight group to [lo, hi], rounds it to the group's grid and
// scores q - w through the group's Gram matrix. In PyTorch the clamp, division, rounding,
// range limits, scaling, difference and the cast for the Gram product are eight passes over
// the candidate's buffer; here they are one, with the same IEEE operations in the same order
// (no contraction into fused multiply-adds: built with -ffp-contract=off), so the result is
// bit for bit the PyTorch steps' (tests/test_search_ops.py compares).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// float -> bfloat16 bits, round to nearest even (PyTorch's conversion; NaN -> quiet NaN)
inline uint16_t to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return 0x7FC0;
  const uint32_t rounding_bias = 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

template <typename Out, typename Store>
void candidate_delta(const torch::Tensor& piece, const torch::Tensor& hi, const torch::Tensor& lo,
                     const torch::Tensor& scales, const torch::Tensor& zeros, double q_max, Out* out,
                     Store store) {
  const int64_t group = piece.size(-1);
  const int64_t rows = piece.numel() / group;
  const float* w = piece.data_ptr<float>();
  const float* hi_p = hi.data_ptr<float>();
  const float* lo_p = lo.data_ptr<float>();
  const float* s_p = scales.data_ptr<float>();
  const float* z_p = zeros.data_ptr<float>();
  const float top = static_cast<float>(q_max);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float h = hi_p[r], l = lo_p[r], s = s_p[r], z = z_p[r];
      const float low_level = -z, high_level = top - z;
      const float* wr = w + r * group;
      Out* o = out + r * group;
      for (int64_t e = 0; e < group; ++e) {
        const float clamped = std::max(std::min(wr[e], h), l);
        float level = std::nearbyint(clamped / s);
        level = std::min(std::max(level, low_level), high_level);
        store(o + e, level * s - wr[e]);
      }
    }
  });
}

void check_rows(const torch::Tensor& t, const torch::Tensor& piece, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 tensor");
  TORCH_CHECK(t.numel() * piece.size(-1) == piece.numel(), name, " must hold one value per group of piece");
}

}  // namespace

// out = Q(clamp(piece, lo, hi)) - piece, per group (the last dimension of piece): Q rounds to
// the grid scales * (level - zeros), level in [0, q_max]. out is float32 or bfloat16, piece's shape.
torch::Tensor clip_candidate_delta(const torch::Tensor& piece, const torch::Tensor& hi,
                                   const torch::Tensor& lo, const torch::Tensor& scales,
                                   const torch::Tensor& zeros, double q_max, torch::Tensor out) {
  TORCH_CHECK(piece.device().is_cpu(), "piece must be on the CPU");
  TORCH_CHECK(piece.scalar_type() == torch::kFloat32 && piece.is_contiguous() && piece.dim() >= 1,
              "piece must be a contiguous float32 tensor");
  check_rows(hi, piece, "hi");
  check_rows(lo, piece, "lo");
  check_rows(scales, piece, "scales");
  check_rows(zeros, piece, "zeros");
  TORCH_CHECK(out.sizes() == piece.sizes() && out.is_contiguous(), "out must be contiguous, piece's shape");
  if (out.scalar_type() == torch::kBFloat16) {
    auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    candidate_delta(piece, hi, lo, scales, zeros, q_max, o,
                    [](uint16_t* dst, float v) { *dst = to_bf16_bits(v); });
  } else {
    TORCH_CHECK(out.scalar_type() == torch::kFloat32, "out must be float32 or bfloat16");
    candidate_delta(piece, hi, lo, scales, zeros, q_max, out.data_ptr<float>(),
                    [](float* dst, float v) { *dst = v; });
  }
  return out;
}

namespace {

inline float from_bf16_bits(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

template <typename In, typename Load>
void group_errors(const In* cd, const In* d, int64_t rows, int64_t group, float* out, Load load) {
  constexpr int kLanes = 16;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const In* a = cd + r * group;
      const In* b = d + r * group;
      float lanes[kLanes] = {0.0f};
      int64_t e = 0;
      for (; e + kLanes <= group; e += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += load(a[e + l], b[e + l]);
      float total = 0.0f;
      for (; e < group; ++e) total += load(a[e], b[e]);
      for (int l = 0; l < kLanes; ++l) total += lanes[l];
      out[r] = total;
    }
  });
}

}  // namespace

// out[...] = sum over the last dimension of (cd * d), each product rounded to the inputs' dtype as
// PyTorch's element-wise product is (bf16 or float32), the sum in float32: a candidate's
// d^T C d per group, from cd = d C. Sixteen running sums per group, then their total: the order
// differs from torch.sum's, so the last bits may too.
torch::Tensor clip_candidate_error(const torch::Tensor& cd, const torch::Tensor& d, torch::Tensor out) {
  TORCH_CHECK(cd.device().is_cpu() && cd.is_contiguous() && d.is_contiguous() && cd.sizes() == d.sizes() &&
                  cd.scalar_type() == d.scalar_type() && cd.dim() >= 1,
              "cd and d must be contiguous CPU tensors of one shape and dtype");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() &&
                  out.numel() * cd.size(-1) == cd.numel(),
              "out must be a contiguous float32 tensor with one value per group");
  const int64_t group = cd.size(-1), rows = cd.numel() / group;
  if (cd.scalar_type() == torch::kBFloat16) {
    const auto* a = reinterpret_cast<const uint16_t*>(cd.data_ptr<at::BFloat16>());
    const auto* b = reinterpret_cast<const uint16_t*>(d.data_ptr<at::BFloat16>());
    group_errors(a, b, rows, group, out.data_ptr<float>(), [](uint16_t x, uint16_t y) {
      return from_bf16_bits(to_bf16_bits(from_bf16_bits(x) * from_bf16_bits(y)));
    });
  } else {
    TORCH_CHECK(cd.scalar_type() == torch::kFloat32, "cd and d must be float32 or bfloat16");
    group_errors(cd.data_ptr<float>(), d.data_ptr<float>(), rows, group, out.data_ptr<float>(),
                 [](float x, float y) { return x * y; });
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("clip_candidate_error", &clip_candidate_error,
        "sum over the last dimension of cd * d (products in the inputs' dtype, sum in float32)");
  m.def("clip_candidate_delta", &clip_candidate_delta,
        "Q(clamp(piece, lo, hi)) - piece per group, in one pass (float32 or bfloat16 out)");
}

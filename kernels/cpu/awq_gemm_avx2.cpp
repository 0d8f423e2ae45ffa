// AWQ INT4 x activation GEMM for x86 CPUs without AVX-512 VNNI (AVX2, and AVX-VNNI).
//
// y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k/G]) * s[n, k/G]  (+ bias[n])
//
// The arithmetic is the AVX-512 kernel's (awq_gemm.cpp): activations are
// quantized to int8 per (row, group), the int4 x int8 dot of a group is exact in
// integers, the zero point is corrected exactly (sum (q - z) a = sum q a - z sum a;
// on the many-row path exactly for groups below 8808 k, see run_block_panel) and
// each group is scaled once in fp32. So the error bound is the same.
//
// The weight layout is the AVX-512 kernel's too (kernels.repack_for_cpu): a
// 64-byte row holds 16 output channels x 8 input channels as nibbles, byte 4*j + i
// = q[n0 + j, k0 + i] (low) | q[n0 + j, k0 + 4 + i] (high). Its two 32-byte halves
// are exactly two ymm registers of "4 consecutive k of one output channel" per
// 32-bit lane (channels 0-7 and 8-15), so the same blocked stream serves both
// kernels and one repack (tested once) serves both.
//
// Two inner products, chosen at run time by the caller from the CPU flags:
//   - AVX2: vpmaddubsw (u8 nibble x s8 activation, pairs summed to int16), two of
//     them (low and high nibbles) added in int16, accumulated in int16 over
//     kChunk rows of 8 k, then vpmaddwd with ones widens to int32 once per chunk.
//     No saturation: |pair| <= 2 * 15 * 127 = 3810, a row adds two pairs (7620)
//     and kChunk = 4 rows stay below 32767.
//   - AVX-VNNI: the VEX vpdpbusd (u8 x s8, 4 products summed into int32), as the
//     AVX-512 kernel does with zmm. Compiled with a function target attribute so
//     that the rest of this file stays plain AVX2 and runs on CPUs without it.
//
// This file is compiled with -mavx2 -mfma -mf16c only (never -mavx512*), also on
// AVX-512 hosts, so the code tested here is the code an AVX2-only CPU runs.

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

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define AWQ_HAVE_AVX2 1
#include <immintrin.h>
#else
#define AWQ_HAVE_AVX2 0
#endif

#if AWQ_HAVE_AVX2 && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 11)
#define AWQ_HAVE_AVXVNNI_CODE 1  // the compiler knows the VEX vpdpbusd
#elif AWQ_HAVE_AVX2 && defined(__clang__) && (__clang_major__ >= 12)
#define AWQ_HAVE_AVXVNNI_CODE 1
#else
#define AWQ_HAVE_AVXVNNI_CODE 0
#endif

namespace {

constexpr int64_t kTileN = 16;      // output channels per tile (as in awq_gemm.cpp)
constexpr int64_t kBlockTiles = 4;  // tiles per block (as in awq_gemm.cpp and kernels.CPU_BLOCK_TILES)
constexpr int64_t kMaxRows = 3;     // activation rows per micro-kernel call (see run_block)
constexpr int64_t kChunk = 4;       // rows of 8 k accumulated in int16 before widening (see top)

using Problem = awq_cpu::TiledProblem;

using awq_cpu::to_float;

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#if AWQ_HAVE_AVX2

// 8 consecutive elements as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// int8 activations per (row, group): a_q = round_half_even(x * (127 / amax)), s_a = amax / 127.
template <typename scalar_t>
void quantize_rows(const scalar_t* x, const Problem& p, int64_t m0, int64_t m1, int8_t* aq, float* sa,
                   int32_t* suma) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const int64_t g8 = p.G / 8 * 8;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < p.NG; ++g) {
      const scalar_t* xg = x + m * p.K + g * p.G;
      int8_t* qg = aq + m * p.Kp + g * p.Gp;
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t i = 0; i < g8; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, load8(xg + i)));
      float amax = hmax8(vmax);
      for (int64_t i = g8; i < p.G; ++i) amax = std::max(amax, std::fabs(to_float(xg[i])));
      const float inv_s = amax > 0.f ? 127.f / amax : 0.f;
      const __m256 inv = _mm256_set1_ps(inv_s);
      __m256i vsum = _mm256_setzero_si256();
      for (int64_t i = 0; i < g8; i += 8) {
        // cvtps_epi32 rounds half to even (default MXCSR), like torch.round.
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8(xg + i), inv));  // |q| <= 127
        vsum = _mm256_add_epi32(vsum, q);
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        const __m128i q8 = _mm_packs_epi16(q16, q16);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qg + i), q8);
      }
      int32_t sum = hsum8(vsum);
      for (int64_t i = g8; i < p.G; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(to_float(xg[i]) * inv_s));
        qg[i] = static_cast<int8_t>(q);
        sum += q;
      }
      for (int64_t i = p.G; i < p.Gp; ++i) qg[i] = 0;
      sa[m * p.NG + g] = amax / 127.f;
      suma[m * p.NG + g] = sum;
    }
  }
}

// Group end for ROWS rows x NT tiles: exact zero-point correction of the int32
// dots in `iacc` ([ROWS][2 * NT][8], in L1), then y += dot * (s_w * s_a) in fp32.
template <int ROWS, int NT>
inline void fold_group(const int32_t* iacc, const c10::Half* ws, const uint8_t* wz,
                       int64_t meta0, const float* sa_rows, const int32_t* suma_rows, int64_t ng_stride,
                       int64_t g, float* acc) {
  for (int c = 0; c < 2 * NT; ++c) {
    const int64_t meta = meta0 + 8 * c;  // tile c / 2, channels 8 * (c % 2) ..
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + meta)));
    const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wz + meta)));
    for (int r = 0; r < ROWS; ++r) {
      const __m256i zsum = _mm256_mullo_epi32(z, _mm256_set1_epi32(suma_rows[r * ng_stride + g]));
      const __m256i d = _mm256_load_si256(reinterpret_cast<const __m256i*>(iacc + (r * 2 * NT + c) * 8));
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(d, zsum));
      const __m256 scale = _mm256_mul_ps(s, _mm256_set1_ps(sa_rows[r * ng_stride + g]));
      float* y = acc + r * kBlockTiles * kTileN + 8 * c;
      _mm256_storeu_ps(y, _mm256_fmadd_ps(dot, scale, _mm256_loadu_ps(y)));
    }
  }
}

// The micro-kernel arguments: NT tiles starting at tile t0 of a block of nb tiles.
struct Tiles {
  const uint8_t* wq;     // the block's weight stream
  const c10::Half* ws;   // the block's scales
  const uint8_t* wz;     // the block's zeros
  int64_t nb, t0;        // tiles in the block, first tile of this call
  bool prefetch;         // prefetch the block's stream 4 KiB ahead (first pass over it)
};

// ROWS activation rows x NT tiles (2 * NT ymm columns of 8 channels), over all of K.
// Registers: ROWS * 2 * NT int16 accumulators (<= 8) plus the decoded nibbles; the
// int32 group sums live in L1 (touched once per kChunk rows), so nothing spills from
// the inner loop (16 ymm registers in all).
template <int ROWS, int NT>
void tiles_avx2(const Tiles& tl, const int8_t* __restrict aq, const float* __restrict sa,
                const int32_t* __restrict suma, const Problem& p, int64_t m0, float* __restrict acc) {
  constexpr int C = 2 * NT;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t k8n = p.Gp / 8;
  const int64_t row_bytes = tl.nb * 64;  // one row of 8 k across the block's tiles
  const int8_t* a_rows = aq + m0 * p.Kp;
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc + r * kBlockTiles * kTileN + tl.t0 * kTileN + 8 * c, _mm256_setzero_ps());

  alignas(32) int32_t iacc[ROWS * C * 8];
  for (int64_t g = 0; g < p.NG; ++g) {
    for (int i = 0; i < ROWS * C * 8; i += 8) _mm256_store_si256(reinterpret_cast<__m256i*>(iacc + i), _mm256_setzero_si256());
    const int8_t* ag = a_rows + g * p.Gp;
    for (int64_t k0 = 0; k0 < k8n; k0 += kChunk) {
      const int64_t k1 = std::min(k8n, k0 + kChunk);
      __m256i acc16[ROWS][C];
      for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) acc16[r][c] = _mm256_setzero_si256();
      for (int64_t k8 = k0; k8 < k1; ++k8) {
        const uint8_t* w = tl.wq + (g * k8n + k8) * row_bytes + tl.t0 * 64;
        if (tl.prefetch)
          for (int64_t t = 0; t < tl.nb; ++t) _mm_prefetch(reinterpret_cast<const char*>(w) + 4096 + 64 * t, _MM_HINT_T0);
        if constexpr (ROWS == 1) {
          // One row, up to 8 columns: decode each column just before its use.
          const __m256i a_lo = _mm256_set1_epi32(load_i32(ag + 8 * k8));
          const __m256i a_hi = _mm256_set1_epi32(load_i32(ag + 8 * k8 + 4));
          for (int c = 0; c < C; ++c) {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
            const __m256i lo = _mm256_and_si256(raw, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            const __m256i two = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
            acc16[0][c] = _mm256_add_epi16(acc16[0][c], two);
          }
        } else {
          // Several rows: decode the (<= 2) columns once, then broadcast each row's
          // activations just before its use, so that only 2 of them are live.
          __m256i lo[C], hi[C];
          for (int c = 0; c < C; ++c) {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
            lo[c] = _mm256_and_si256(raw, low4);
            hi[c] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
          }
          for (int r = 0; r < ROWS; ++r) {
            const __m256i a_lo = _mm256_set1_epi32(load_i32(ag + r * p.Kp + 8 * k8));
            const __m256i a_hi = _mm256_set1_epi32(load_i32(ag + r * p.Kp + 8 * k8 + 4));
            for (int c = 0; c < C; ++c) {
              const __m256i two =
                  _mm256_add_epi16(_mm256_maddubs_epi16(lo[c], a_lo), _mm256_maddubs_epi16(hi[c], a_hi));
              acc16[r][c] = _mm256_add_epi16(acc16[r][c], two);
            }
          }
        }
      }
      for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) {
          __m256i* dst = reinterpret_cast<__m256i*>(iacc + (r * C + c) * 8);
          _mm256_store_si256(dst, _mm256_add_epi32(_mm256_load_si256(dst), _mm256_madd_epi16(acc16[r][c], ones)));
        }
    }
    fold_group<ROWS, NT>(iacc, tl.ws, tl.wz, (g * tl.nb + tl.t0) * kTileN, sa + m0 * p.NG, suma + m0 * p.NG,
                         p.NG, g, acc + tl.t0 * kTileN);
  }
}

#if AWQ_HAVE_AVXVNNI_CODE
// The same with the VEX vpdpbusd of AVX-VNNI (Alder Lake and later, Zen 5): int32
// accumulators, no int16 stage. Only ever called when the CPU reports avx_vnni.
template <int ROWS, int NT>
__attribute__((target("avx2,fma,f16c,avxvnni"))) void tiles_avxvnni(
    const Tiles& tl, const int8_t* __restrict aq, const float* __restrict sa, const int32_t* __restrict suma,
    const Problem& p, int64_t m0, float* __restrict acc) {
  constexpr int C = 2 * NT;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t k8n = p.Gp / 8;
  const int64_t row_bytes = tl.nb * 64;
  const int8_t* a_rows = aq + m0 * p.Kp;
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc + r * kBlockTiles * kTileN + tl.t0 * kTileN + 8 * c, _mm256_setzero_ps());

  for (int64_t g = 0; g < p.NG; ++g) {
    __m256i iacc[ROWS][C];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < C; ++c) iacc[r][c] = _mm256_setzero_si256();
    const int8_t* ag = a_rows + g * p.Gp;
    for (int64_t k8 = 0; k8 < k8n; ++k8) {
      const uint8_t* w = tl.wq + (g * k8n + k8) * row_bytes + tl.t0 * 64;
      if (tl.prefetch)
        for (int64_t t = 0; t < tl.nb; ++t) _mm_prefetch(reinterpret_cast<const char*>(w) + 4096 + 64 * t, _MM_HINT_T0);
      __m256i a_lo[ROWS], a_hi[ROWS];
      for (int r = 0; r < ROWS; ++r) {
        a_lo[r] = _mm256_set1_epi32(load_i32(ag + r * p.Kp + 8 * k8));
        a_hi[r] = _mm256_set1_epi32(load_i32(ag + r * p.Kp + 8 * k8 + 4));
      }
      for (int c = 0; c < C; ++c) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
        const __m256i lo = _mm256_and_si256(raw, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        for (int r = 0; r < ROWS; ++r) {
          iacc[r][c] = _mm256_dpbusd_avx_epi32(iacc[r][c], lo, a_lo[r]);
          iacc[r][c] = _mm256_dpbusd_avx_epi32(iacc[r][c], hi, a_hi[r]);
        }
      }
    }
    alignas(32) int32_t sums[ROWS * C * 8];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < C; ++c) _mm256_store_si256(reinterpret_cast<__m256i*>(sums + (r * C + c) * 8), iacc[r][c]);
    fold_group<ROWS, NT>(sums, tl.ws, tl.wz, (g * tl.nb + tl.t0) * kTileN, sa + m0 * p.NG, suma + m0 * p.NG,
                         p.NG, g, acc + tl.t0 * kTileN);
  }
}
#endif  // AWQ_HAVE_AVXVNNI_CODE

// One block for `rows` rows starting at m0: the tiles in passes of NT. Register
// budget (16 ymm): one row takes up to 4 tiles (8 int16 accumulators, each column
// decoded just in time); 2-3 rows take one tile (2 columns decoded once = 4 ymm,
// 2 * ROWS accumulators, 2 activation broadcasts). 4 rows x 1 tile would need 17,
// and GCC 12 then keeps only 3 of its 8 accumulators in registers, hence kMaxRows = 3
// (equal speed at M = 16, about 5% faster at M = 64 in a hot-cache A/B on 1 thread).
template <bool VNNI>
void run_block(const Tiles& base, const int8_t* aq, const float* sa, const int32_t* suma, const Problem& p,
               int64_t m0, int64_t rows, float* acc) {
  for (int64_t t0 = 0; t0 < base.nb;) {
    Tiles tl = base;
    tl.t0 = t0;
    tl.prefetch = base.prefetch && t0 == 0;
    int64_t step;
#if AWQ_HAVE_AVXVNNI_CODE
#define AWQ_CALL(R, T) (VNNI ? tiles_avxvnni<R, T>(tl, aq, sa, suma, p, m0, acc) : tiles_avx2<R, T>(tl, aq, sa, suma, p, m0, acc))
#else
#define AWQ_CALL(R, T) tiles_avx2<R, T>(tl, aq, sa, suma, p, m0, acc)
#endif
    const int64_t left = base.nb - t0;
    if (rows == 1) {
      step = left;
      switch (left) {
        case 1: AWQ_CALL(1, 1); break;
        case 2: AWQ_CALL(1, 2); break;
        case 3: AWQ_CALL(1, 3); break;
        default: step = 4; AWQ_CALL(1, 4); break;
      }
    } else {
      step = 1;
      if (rows == 2) AWQ_CALL(2, 1); else AWQ_CALL(3, 1);
    }
#undef AWQ_CALL
    t0 += step;
  }
}

// ---------------------------------------------------------------------------------
// Many rows (M >= kPanelMinRows): decode once, reuse for a panel of rows.
//
// The kernels above decode the nibbles in registers for every 1-3 rows, which costs
// three ALU ops per column per 8 k next to the four of the arithmetic. With many rows
// the block's weights are decoded once per chunk of kChunk rows of 8 k into an L1
// buffer of bytes (low and high nibbles apart) and every row of the panel reads them
// from there: per column and row only the two vpmaddubsw and two adds remain, so the
// arithmetic, not the decode, bounds the speed (the regime of M = 16..256). The int32
// group sums of the panel live in L1 too, widened once per chunk as above.
constexpr int64_t kPanelRows = 64;     // rows sharing one decode (iacc: 16 KiB, acc: 16 KiB)
constexpr int64_t kPanelMinRows = 4;   // from here on the decoded panel is faster
constexpr int64_t kPanelStep = 4;      // rows per micro-kernel call (see panel_chunk)
constexpr int64_t kColBytes = 64;      // one decoded column of 8 k: 32 bytes low, 32 high nibbles
constexpr int64_t kDecRowBytes = 2 * kBlockTiles * kColBytes;  // one row of 8 k, all columns

// Decodes rows k0..k1 of 8 k of group g of the block (nb tiles) into dec.
inline void decode_chunk(const uint8_t* wq, int64_t nb, int64_t g, int64_t k8n, int64_t k0, int64_t k1,
                         uint8_t* __restrict dec) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t row_bytes = nb * 64;
  for (int64_t k8 = k0; k8 < k1; ++k8) {
    const uint8_t* w = wq + (g * k8n + k8) * row_bytes;
    for (int64_t t = 0; t < nb; ++t) _mm_prefetch(reinterpret_cast<const char*>(w) + 4096 + 64 * t, _MM_HINT_T0);
    uint8_t* d = dec + (k8 - k0) * kDecRowBytes;
    for (int64_t c = 0; c < 2 * nb; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + kColBytes * c), _mm256_and_si256(raw, low4));
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + kColBytes * c + 32),
                         _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4));
    }
  }
}

// ROWS rows x all columns of the block over one decoded chunk of nk8 rows of 8 k:
// iacc[r][c][0..8] += the int32 dots. A tile (2 columns) at a time: its 4 decoded
// vectors stay in registers while each row's 2 activation broadcasts stream past
// (ROWS * 2 accumulators + 4 + 2 <= 14 of the 16 ymm).
template <int ROWS>
inline void panel_chunk(const uint8_t* __restrict dec, int64_t nk8, int64_t columns, const int8_t* __restrict a,
                        int64_t Kp, int32_t* __restrict iacc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < columns; c += 2) {
    __m256i acc16[ROWS][2];
    for (int r = 0; r < ROWS; ++r) acc16[r][0] = acc16[r][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < nk8; ++k) {
      const uint8_t* d = dec + k * kDecRowBytes + kColBytes * c;
      const __m256i w0lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(d));
      const __m256i w0hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(d + 32));
      const __m256i w1lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(d + 64));
      const __m256i w1hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(d + 96));
      for (int r = 0; r < ROWS; ++r) {
        const __m256i a_lo = _mm256_set1_epi32(load_i32(a + r * Kp + 8 * k));
        const __m256i a_hi = _mm256_set1_epi32(load_i32(a + r * Kp + 8 * k + 4));
        acc16[r][0] = _mm256_add_epi16(acc16[r][0], _mm256_maddubs_epi16(w0lo, a_lo));
        acc16[r][0] = _mm256_add_epi16(acc16[r][0], _mm256_maddubs_epi16(w0hi, a_hi));
        acc16[r][1] = _mm256_add_epi16(acc16[r][1], _mm256_maddubs_epi16(w1lo, a_lo));
        acc16[r][1] = _mm256_add_epi16(acc16[r][1], _mm256_maddubs_epi16(w1hi, a_hi));
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < 2; ++j) {
        __m256i* dst = reinterpret_cast<__m256i*>(iacc + (r * 2 * kBlockTiles + c + j) * 8);
        _mm256_store_si256(dst, _mm256_add_epi32(_mm256_load_si256(dst), _mm256_madd_epi16(acc16[r][j], ones)));
      }
  }
}

// One block for the panel of `rows` rows at m0: acc[r][0..16 * nb] = the block's outputs.
void run_block_panel(const Tiles& tl, const int8_t* aq, const float* sa, const int32_t* suma, const Problem& p,
                     int64_t m0, int64_t rows, float* __restrict acc, int32_t* __restrict iacc,
                     uint8_t* __restrict dec) {
  const int64_t k8n = p.Gp / 8;
  const int64_t columns = 2 * tl.nb;
  for (int64_t r = 0; r < rows; ++r)
    std::fill(acc + r * kBlockTiles * kTileN, acc + r * kBlockTiles * kTileN + tl.nb * kTileN, 0.f);
  for (int64_t g = 0; g < p.NG; ++g) {
    std::fill(iacc, iacc + rows * 2 * kBlockTiles * 8, 0);
    for (int64_t k0 = 0; k0 < k8n; k0 += kChunk) {
      const int64_t k1 = std::min(k8n, k0 + kChunk);
      decode_chunk(tl.wq, tl.nb, g, k8n, k0, k1, dec);
      const int8_t* a = aq + m0 * p.Kp + g * p.Gp + 8 * k0;
      for (int64_t r = 0; r < rows; r += kPanelStep) {
        int32_t* ia = iacc + r * 2 * kBlockTiles * 8;
        switch (std::min(kPanelStep, rows - r)) {
          case 1: panel_chunk<1>(dec, k1 - k0, columns, a + r * p.Kp, p.Kp, ia); break;
          case 2: panel_chunk<2>(dec, k1 - k0, columns, a + r * p.Kp, p.Kp, ia); break;
          case 3: panel_chunk<3>(dec, k1 - k0, columns, a + r * p.Kp, p.Kp, ia); break;
          default: panel_chunk<4>(dec, k1 - k0, columns, a + r * p.Kp, p.Kp, ia); break;
        }
      }
    }
    // Group end: the zero-point correction and the scales. The block's scales and zeros go
    // to fp32 once per group; then per row y += (dot - z * sum a) * (s * s_a), the
    // correction in one fused multiply-add. That is exact while both terms are integers
    // below 2^24, i.e. G * 15 * 127 < 2^24 (G < 8808: every grouped scheme). Per-channel
    // groups on a wider K round dot to fp32 once more (2^-24 relative), far below the
    // error of the int8 activations. Rows outer, columns inner: two broadcasts per row.
    alignas(32) float sf[2 * kBlockTiles * 8], zf[2 * kBlockTiles * 8];
    for (int64_t c = 0; c < columns; ++c) {
      const int64_t meta = (g * tl.nb) * kTileN + 8 * c;
      _mm256_store_ps(sf + 8 * c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tl.ws + meta))));
      _mm256_store_ps(zf + 8 * c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tl.wz + meta)))));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t ag = (m0 + r) * p.NG + g;
      const __m256 asum = _mm256_set1_ps(static_cast<float>(suma[ag]));
      const __m256 s_a = _mm256_set1_ps(sa[ag]);
      const int32_t* ia = iacc + r * 2 * kBlockTiles * 8;
      float* y = acc + r * kBlockTiles * kTileN;
      for (int64_t c = 0; c < columns; ++c) {
        const __m256 d = _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(ia + 8 * c)));
        const __m256 dot = _mm256_fnmadd_ps(_mm256_load_ps(zf + 8 * c), asum, d);
        const __m256 scale = _mm256_mul_ps(_mm256_load_ps(sf + 8 * c), s_a);
        _mm256_storeu_ps(y + 8 * c, _mm256_fmadd_ps(dot, scale, _mm256_loadu_ps(y + 8 * c)));
      }
    }
  }
}

#endif  // AWQ_HAVE_AVX2

// Adds bias and writes `rows` rows of one block's fp32 results to y.
template <typename scalar_t>
void store_block(const float* acc, const float* bias, const Problem& p, int64_t m0, int64_t rows, int64_t n0,
                 int64_t nb, scalar_t* y) {
  const int64_t n_end = std::min(p.N, n0 + nb * kTileN);
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = acc + r * kBlockTiles * kTileN;
    scalar_t* out = y + (m0 + r) * p.N;
    for (int64_t n = n0; n < n_end; ++n) out[n] = static_cast<scalar_t>(a[n - n0] + (bias != nullptr ? bias[n] : 0.f));
  }
}

template <typename scalar_t>
void run_gemm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, const at::Tensor& wz,
              const float* bias, const Problem& p, bool vnni, at::Tensor& y) {
#if AWQ_HAVE_AVX2
  auto aq = at::empty({p.M, p.Kp}, x.options().dtype(at::kChar));
  auto sa = at::empty({p.M, p.NG}, x.options().dtype(at::kFloat));
  auto suma = at::empty({p.M, p.NG}, x.options().dtype(at::kInt));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  int8_t* aqp = aq.data_ptr<int8_t>();
  float* sap = sa.data_ptr<float>();
  int32_t* sump = suma.data_ptr<int32_t>();
  const int64_t row_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.K, 1));
  at::parallel_for(0, p.M, row_grain, [&](int64_t m0, int64_t m1) { quantize_rows(xp, p, m0, m1, aqp, sap, sump); });

  const uint8_t* wqp = wq.data_ptr<uint8_t>();
  const c10::Half* wsp = ws.data_ptr<c10::Half>();
  const uint8_t* wzp = wz.data_ptr<uint8_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t tile_bytes = p.NG * p.Gp * kTileN / 2;
  const int64_t tile_meta = p.NG * kTileN;

  // Dynamic blocks, as in awq_gemm.cpp: the machine is shared.
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.blocks));
  // With many rows (and no AVX-VNNI, whose int32 accumulators decode cheaply enough) each
  // block is decoded once per panel of rows instead of once per 1-3 rows (see run_block_panel).
  const bool panel = !vnni && p.M >= kPanelMinRows;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    alignas(64) float acc[kPanelRows * kBlockTiles * kTileN];
    alignas(64) int32_t iacc[kPanelRows * 2 * kBlockTiles * 8];
    alignas(64) uint8_t dec[kChunk * kDecRowBytes];
    for (int64_t b; (b = next_block.fetch_add(1, std::memory_order_relaxed)) < p.blocks;) {
      const int64_t t0 = b * kBlockTiles;
      Tiles tl{wqp + t0 * tile_bytes, wsp + t0 * tile_meta, wzp + t0 * tile_meta,
               std::min(kBlockTiles, p.tiles - t0), 0, false};
      for (int64_t m0 = 0; panel && m0 < p.M; m0 += kPanelRows) {
        const int64_t rows = std::min(kPanelRows, p.M - m0);
        run_block_panel(tl, aqp, sap, sump, p, m0, rows, acc, iacc, dec);
        store_block(acc, bias, p, m0, rows, t0 * kTileN, tl.nb, yp);
      }
      for (int64_t m0 = 0; !panel && m0 < p.M; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, p.M - m0);
        tl.prefetch = m0 == 0;  // later row chunks find the block in L2
        if (vnni)
          run_block<true>(tl, aqp, sap, sump, p, m0, rows, acc);
        else
          run_block<false>(tl, aqp, sap, sump, p, m0, rows, acc);
        store_block(acc, bias, p, m0, rows, t0 * kTileN, tl.nb, yp);
      }
    }
  });
#else
  TORCH_CHECK(false, "the AVX2 AWQ kernel was compiled without AVX2");
#endif
}

}  // namespace

// x: [M, K] fp32/bf16/fp16, contiguous. wq/ws/wz: the repacked weight (kernels.repack_for_cpu).
// bias: optional [N]. vnni: use the AVX-VNNI inner product (only where the CPU has avx_vnni).
// Returns y: [M, N] in x's dtype.
at::Tensor awq_gemm_avx2(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, const at::Tensor& wz,
                         int64_t group_size, int64_t out_features, const c10::optional<at::Tensor>& bias,
                         bool vnni) {
  const int64_t K = awq_cpu::check_gemm_args(x, wq, ws, wz, at::kHalf, "fp16", group_size);
  TORCH_CHECK(!vnni || AWQ_HAVE_AVXVNNI_CODE, "this build has no AVX-VNNI path");
  const Problem p = awq_cpu::make_tiled_problem(x.size(0), out_features, K, group_size, kTileN, kBlockTiles);
  TORCH_CHECK(wq.numel() == p.tiles * p.NG * p.Gp * kTileN / 2, "wq size does not match K, N, group_size");
  awq_cpu::check_meta_size(ws, wz, p.tiles * p.NG * kTileN);
  at::Tensor bias_f;
  const float* bias_ptr = awq_cpu::bias_as_float(bias, out_features, bias_f);
  at::Tensor y = at::empty({p.M, p.N}, x.options());
  if (p.M == 0) return y;
  awq_cpu::dispatch_activation_dtype(x.scalar_type(), [&](auto zero) {
    run_gemm<decltype(zero)>(x, wq, ws, wz, bias_ptr, p, vnni, y);
  });
  return y;
}

bool awq_avx2_compiled() { return AWQ_HAVE_AVX2; }
bool awq_avxvnni_compiled() { return AWQ_HAVE_AVXVNNI_CODE; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("awq_gemm_avx2", &awq_gemm_avx2, "AWQ int4 GEMM (AVX2 / AVX-VNNI) on the repacked CPU layout",
        py::arg("x"), py::arg("wq"), py::arg("ws"), py::arg("wz"), py::arg("group_size"),
        py::arg("out_features"), py::arg("bias") = py::none(), py::arg("vnni") = false);
  m.def("has_avx2", &awq_avx2_compiled, "whether the AVX2 path was compiled in");
  m.def("has_avxvnni_code", &awq_avxvnni_compiled, "whether the AVX-VNNI path was compiled in");
}

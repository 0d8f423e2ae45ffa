// AWQ INT4 x activation GEMM for x86 CPUs.
//
// y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k/G]) * s[n, k/G]  (+ bias[n])
//
// Strategy (the llama.cpp Q4_0 x Q8_0 idea, adapted to AWQ's zero points):
//   1. Activations are quantized once per call to int8 per (row, group):
//      a_q = round(x * 127 / amax), s_a = amax / 127, and sum_a = sum_k a_q.
//   2. Weights were repacked once at load time (see repack_awq_for_cpu in
//      kernels/__init__.py) into the layout below, so that a 64-byte load holds
//      16 output channels x 8 input channels as nibbles. One vpand and one
//      vpsrlw+vpand give two registers of unsigned bytes whose 32-bit lanes
//      are "4 consecutive k of one output channel": exactly the u8 operand of
//      vpdpbusd, while the s8 operand is 4 activation bytes broadcast.
//   3. Per group the exact integer dot is corrected for the zero point,
//      sum_k (q - z) * a_q = sum_k q * a_q - z * sum_a, and scaled in fp32 by
//      s_w * s_a. Only the per-group scaling is rounded.
//
// Packed weight layout (Gp = G rounded up to 8, NG = K / G, tiles of 16
// output channels, blocks of up to kBlockTiles tiles; the last block may be
// narrower):
//   wq: [block][group g][k8 in Gp/8][tile t in block][64 bytes]
//       byte 4*j + i of a 64-byte row: low nibble = q[n0 + j, k0 + i],
//       high nibble = q[n0 + j, k0 + 4 + i], with k0 = g*G + 8*k8.
//   ws: [block][g][t][16] fp16 scales;  wz: [block][g][t][16] uint8 zeros.
// Block b starts at b * kBlockTiles tiles, so a block is one linear stream.
// Padding channels (N rounded up to 16) carry q = z = 0 and s = 0; padding
// k (G rounded up to 8) carry q = 0 and a_q = 0, so they add nothing.
//
// AMX path (CPUs with AMX-INT8, at batch): the same layout and the same int8
// activations, so the same numbers bit for bit. The 64 bytes of one (k8, tile)
// row are, after the nibble split, two rows of the B operand of tdpbssd
// (16 output channels x 4 consecutive k each), so a block's group is decoded
// into B tiles without any shuffle, with the zero point subtracted in int8
// (q - z in [-15, 15]). The A operand is the int8 activations, copied once per
// call into contiguous tiles of 16 rows. Each C tile then holds the exact
// group dots sum_k a_q * (q - z), which the VNNI path reaches by subtracting
// z * sum_a; the group's fp32 scaling is the same instruction sequence.
// The weights are decoded once per block and group and reused for every row.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "awq_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define AWQ_HAVE_AVX512_VNNI 1
#include <immintrin.h>
#else
#define AWQ_HAVE_AVX512_VNNI 0
#endif

// AMX needs the VNNI path's helpers too; build.py passes -mamx-tile -mamx-int8 only on CPUs
// that have them.
#if AWQ_HAVE_AVX512_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define AWQ_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define AWQ_HAVE_AMX 0
#endif

namespace {

constexpr int64_t kTileN = 16;      // output channels per tile (one zmm of int32)
constexpr int64_t kBlockTiles = 4;  // tiles per block (one parallel work item)
constexpr int64_t kMaxRows = 4;     // activation rows per micro-kernel call

using Problem = awq_cpu::TiledProblem;

using awq_cpu::to_float;

// ---------------------------------------------------------------------------
// Portable path: same layout, plain loops. Used when AVX-512 VNNI is absent at
// compile time, and by the tests to pin the layout independently of SIMD.
// ---------------------------------------------------------------------------

template <typename scalar_t>
void quantize_rows_generic(const scalar_t* x, const Problem& p, int64_t m0, int64_t m1, int8_t* aq,
                           float* sa, int32_t* suma) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < p.NG; ++g) {
      int8_t* qg = aq + m * p.Kp + g * p.Gp;
      sa[m * p.NG + g] = awq_cpu::quantize_group(x + m * p.K + g * p.G, p.G, qg, suma + m * p.NG + g);
      for (int64_t i = p.G; i < p.Gp; ++i) qg[i] = 0;
    }
  }
}

// acc[r][c] for rows m0..m0+rows, channels of block b (nb tiles).
void block_generic(const uint8_t* wq, const c10::Half* ws, const uint8_t* wz, const int8_t* aq,
                   const float* sa, const int32_t* suma, const Problem& p, int64_t nb,
                   int64_t m0, int64_t rows, float* acc) {
  const int64_t k8n = p.Gp / 8;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    for (int64_t t = 0; t < nb; ++t) {
      for (int64_t j = 0; j < kTileN; ++j) {
        float y = 0.f;
        for (int64_t g = 0; g < p.NG; ++g) {
          int32_t dot = 0;
          for (int64_t k8 = 0; k8 < k8n; ++k8) {
            const uint8_t* row = wq + ((g * k8n + k8) * nb + t) * 64 + 4 * j;
            const int8_t* a = aq + m * p.Kp + g * p.Gp + 8 * k8;
            for (int i = 0; i < 4; ++i) {
              dot += static_cast<int32_t>(row[i] & 0xF) * a[i];
              dot += static_cast<int32_t>(row[i] >> 4) * a[4 + i];
            }
          }
          const int64_t meta = (g * nb + t) * kTileN + j;
          const int32_t zero = wz[meta];
          const float s = static_cast<float>(ws[meta]);
          y += static_cast<float>(dot - zero * suma[m * p.NG + g]) * (s * sa[m * p.NG + g]);
        }
        acc[r * kBlockTiles * kTileN + t * kTileN + j] = y;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// AVX-512 VNNI path.
// ---------------------------------------------------------------------------
#if AWQ_HAVE_AVX512_VNNI

// 16 consecutive elements (fewer under `mask`) as fp32.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

template <typename scalar_t>
void quantize_rows_avx512(const scalar_t* x, const Problem& p, int64_t m0, int64_t m1, int8_t* aq,
                          float* sa, int32_t* suma) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < p.NG; ++g) {
      const scalar_t* xg = x + m * p.K + g * p.G;
      int8_t* qg = aq + m * p.Kp + g * p.Gp;
      __m512 vmax = _mm512_setzero_ps();
      for (int64_t i = 0; i < p.G; i += 16) {
        const __m512 v = load16(xg + i, tail_mask(p.G - i));
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      }
      const float amax = _mm512_reduce_max_ps(vmax);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m512i vsum = _mm512_setzero_si512();
      for (int64_t i = 0; i < p.G; i += 16) {
        const __mmask16 mask = tail_mask(p.G - i);
        // cvtps_epi32 rounds to nearest even (default MXCSR), like torch.round.
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(xg + i, mask), inv));
        vsum = _mm512_add_epi32(vsum, q);  // masked-off lanes loaded as 0
        _mm_mask_storeu_epi8(qg + i, mask, _mm512_cvtsepi32_epi8(q));
      }
      for (int64_t i = p.G; i < p.Gp; ++i) qg[i] = 0;
      sa[m * p.NG + g] = amax / 127.f;
      suma[m * p.NG + g] = _mm512_reduce_add_epi32(vsum);
    }
  }
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Micro-kernel: ROWS activation rows x NT tiles (16*NT output channels) of one
// block, over all of K. Accumulators: ROWS*NT int32 zmm per group, folded into
// ROWS*NT fp32 zmm at each group end.
// next_block: 0, or the distance in bytes to the next block this thread will
// run; then every line of that block is prefetched into L2 while this pass
// computes from L2 (see run_gemm).
template <int ROWS, int NT>
void block_avx512(const uint8_t* __restrict wq, const c10::Half* __restrict ws,
                  const uint8_t* __restrict wz, const int8_t* __restrict aq,
                  const float* __restrict sa, const int32_t* __restrict suma, const Problem& p,
                  int64_t m0, int64_t next_block, float* __restrict acc) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t k8n = p.Gp / 8;
  const int8_t* a_rows = aq + m0 * p.Kp;
  const float* sa_rows = sa + m0 * p.NG;
  const int32_t* suma_rows = suma + m0 * p.NG;

  // The fp32 sums live in `acc` (L1), not in registers: they change once per
  // group, and the int32 accumulators need the registers in the hot loop.
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(acc + r * kBlockTiles * kTileN + t * kTileN, _mm512_setzero_ps());

  const uint8_t* w = wq;
  for (int64_t g = 0; g < p.NG; ++g) {
    __m512i iacc[ROWS][NT];
    for (int r = 0; r < ROWS; ++r)
      for (int t = 0; t < NT; ++t) iacc[r][t] = _mm512_setzero_si512();
    const int8_t* ag = a_rows + g * p.Gp;
    for (int64_t k8 = 0; k8 < k8n; ++k8, w += NT * 64) {
      if (next_block > 0) {
        for (int t = 0; t < NT; ++t)
          _mm_prefetch(reinterpret_cast<const char*>(w) + next_block + 64 * t, _MM_HINT_T1);
      } else {
        // Software prefetch of every line 4 KiB ahead: measured ~5% faster at
        // M = 1 than the hardware prefetchers alone (which stop at 4 KiB pages).
        for (int t = 0; t < NT; ++t) _mm_prefetch(reinterpret_cast<const char*>(w) + 4096 + 64 * t, _MM_HINT_T0);
      }
      __m512i lo[NT], hi[NT];
      for (int t = 0; t < NT; ++t) {
        const __m512i raw = _mm512_loadu_si512(w + t * 64);
        lo[t] = _mm512_and_si512(raw, low4);
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      }
      for (int r = 0; r < ROWS; ++r) {
        const __m512i a_lo = _mm512_set1_epi32(load_i32(ag + r * p.Kp + 8 * k8));
        const __m512i a_hi = _mm512_set1_epi32(load_i32(ag + r * p.Kp + 8 * k8 + 4));
        for (int t = 0; t < NT; ++t) {
          iacc[r][t] = _mm512_dpbusd_epi32(iacc[r][t], lo[t], a_lo);
          iacc[r][t] = _mm512_dpbusd_epi32(iacc[r][t], hi[t], a_hi);
        }
      }
    }
    // Group end: exact integer zero-point correction, then one fp32 FMA.
    for (int t = 0; t < NT; ++t) {
      const int64_t meta = (g * NT + t) * kTileN;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + meta)));
      const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wz + meta)));
      for (int r = 0; r < ROWS; ++r) {
        const __m512i zsum = _mm512_mullo_epi32(z, _mm512_set1_epi32(suma_rows[r * p.NG + g]));
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[r][t], zsum));
        const __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(sa_rows[r * p.NG + g]));
        float* y = acc + r * kBlockTiles * kTileN + t * kTileN;
        _mm512_storeu_ps(y, _mm512_fmadd_ps(dot, scale, _mm512_loadu_ps(y)));
      }
    }
  }
}

template <int ROWS>
void block_avx512_tiles(int64_t nb, const uint8_t* wq, const c10::Half* ws, const uint8_t* wz,
                        const int8_t* aq, const float* sa, const int32_t* suma, const Problem& p,
                        int64_t m0, int64_t next_block, float* acc) {
  static_assert(kBlockTiles == 4, "dispatch below enumerates 1..4 tiles");
  switch (nb) {
    case 1: return block_avx512<ROWS, 1>(wq, ws, wz, aq, sa, suma, p, m0, next_block, acc);
    case 2: return block_avx512<ROWS, 2>(wq, ws, wz, aq, sa, suma, p, m0, next_block, acc);
    case 3: return block_avx512<ROWS, 3>(wq, ws, wz, aq, sa, suma, p, m0, next_block, acc);
    default: return block_avx512<ROWS, 4>(wq, ws, wz, aq, sa, suma, p, m0, next_block, acc);
  }
}

void block_avx512_dispatch(int64_t rows, int64_t nb, const uint8_t* wq, const c10::Half* ws,
                           const uint8_t* wz, const int8_t* aq, const float* sa, const int32_t* suma,
                           const Problem& p, int64_t m0, int64_t next_block, float* acc) {
  static_assert(kMaxRows == 4, "dispatch below enumerates 1..4 rows");
  switch (rows) {
    case 1: return block_avx512_tiles<1>(nb, wq, ws, wz, aq, sa, suma, p, m0, next_block, acc);
    case 2: return block_avx512_tiles<2>(nb, wq, ws, wz, aq, sa, suma, p, m0, next_block, acc);
    case 3: return block_avx512_tiles<3>(nb, wq, ws, wz, aq, sa, suma, p, m0, next_block, acc);
    default: return block_avx512_tiles<4>(nb, wq, ws, wz, aq, sa, suma, p, m0, next_block, acc);
  }
}

#endif  // AWQ_HAVE_AVX512_VNNI

// ---------------------------------------------------------------------------
// AMX path (tdpbssd on int8 tiles). See the top of the file.
// ---------------------------------------------------------------------------
#if AWQ_HAVE_AMX

constexpr int64_t kAmxRows = 16;  // rows of an A or C tile

// Linux hands out the 8 KiB tile state only to processes that ask for it.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kXfeatureXtiledata = 18;     // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Input channels per tdpbssd: the largest of 64, 32, 16, 8 that divides the padded group.
int64_t amx_k_step(int64_t Gp) {
  for (int64_t step = 64; step > 8; step /= 2)
    if (Gp % step == 0) return step;
  return 8;
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-3: C (16 rows x 16 int32); tmm4-5: A (16 rows x k_step int8);
// tmm6-7: B (k_step / 4 rows x 64 bytes: 16 channels x 4 k).
void amx_configure(int64_t k_step) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = kAmxRows;
    cfg.colsb[t] = 64;
  }
  for (int t = 4; t < 6; ++t) {
    cfg.rows[t] = kAmxRows;
    cfg.colsb[t] = static_cast<uint16_t>(k_step);
  }
  for (int t = 6; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(k_step / 4);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One group of one block (nb tiles) into B tiles: bt[ks][t][k_step / 4 rows][64 bytes], each
// byte q - z. `w` is the block's stream at the group, `wz` the group's zeros [t][16].
void amx_decode_group(const uint8_t* __restrict w, const uint8_t* __restrict wz, int64_t nb,
                      int64_t k8n, int64_t k_step, int8_t* __restrict bt) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i spread = _mm512_set1_epi32(0x01010101);  // one zero into each byte of its lane
  __m512i zero[kBlockTiles];
  for (int64_t t = 0; t < nb; ++t)
    zero[t] = _mm512_mullo_epi32(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wz + t * kTileN))), spread);
  const int64_t b_rows = k_step / 4;
  for (int64_t k8 = 0; k8 < k8n; ++k8) {
    const int64_t ks = 8 * k8 / k_step;
    const int64_t row = 8 * k8 % k_step / 4;
    for (int64_t t = 0; t < nb; ++t) {
      const uint8_t* src = w + (k8 * nb + t) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(src) + 8192, _MM_HINT_T1);  // two groups of g128 ahead, into L2
      const __m512i raw = _mm512_loadu_si512(src);
      const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(raw, low4), zero[t]);
      const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low4), zero[t]);
      int8_t* dst = bt + ((ks * nb + t) * b_rows + row) * 64;
      _mm512_storeu_si512(dst, lo);  // k0 .. k0 + 3
      _mm512_storeu_si512(dst + 64, hi);  // k0 + 4 .. k0 + 7
    }
  }
}

// y[r][0..16) += float(c[r]) * (s * sa[r]) for the 16 rows of one C tile, as the VNNI path
// scales a group. `sa` strides by NG, `y` by kBlockTiles * kTileN.
// `first`: the first group, whose products start the sums (the VNNI path adds them to zero).
inline void amx_scale_tile(const int32_t* __restrict c, __m512 s, const float* __restrict sa,
                           int64_t NG, bool first, float* __restrict y) {
  for (int64_t r = 0; r < kAmxRows; ++r) {
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(c + r * kTileN));
    const __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(sa[r * NG]));
    float* yr = y + r * kBlockTiles * kTileN;
    _mm512_storeu_ps(yr, first ? _mm512_mul_ps(dot, scale) : _mm512_fmadd_ps(dot, scale, _mm512_loadu_ps(yr)));
  }
}

// The int8 activations [Mp][Kp] as A tiles: [Mp / 16][Kp / k_step][16 rows][k_step], each
// tile contiguous. Loaded straight from [Mp][Kp], a tile's 16 rows would be Kp bytes apart,
// often a multiple of 4 KiB, and share one L1 set (no gain measured on the Xeon, where the
// copy costs little).
void amx_tile_activations(const int8_t* aq, int64_t Mp, int64_t Kp, int64_t k_step, int8_t* at) {
  const int64_t chunks = Kp / k_step;
  at::parallel_for(0, Mp, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t c = 0; c < chunks; ++c)
        std::memcpy(at + ((m / kAmxRows * chunks + c) * kAmxRows + m % kAmxRows) * k_step,
                    aq + m * Kp + c * k_step, k_step);
  });
}

// One row tile's C tiles (one per channel tile of the block), stored to `c` and waiting to be
// scaled into the accumulators.
struct AmxPending {
  int64_t tiles = 0;            // 0: nothing pending
  const __m512* s = nullptr;    // the group's weight scales per channel tile
  const float* sa = nullptr;    // activation scales of the tile's first row, this group (stride NG)
  float* y = nullptr;           // accumulators of the tile's first row (stride kBlockTiles * kTileN)
  bool first = false;           // group 0
};

void amx_scale_pending(const AmxPending& job, const int32_t* c, int64_t NG) {
  for (int64_t t = 0; t < job.tiles; ++t)
    amx_scale_tile(c + t * kAmxRows * kTileN, job.s[t], job.sa, NG, job.first, job.y + t * kTileN);
}

// One k-step of one row tile against the block's nb channel tiles, the A tile in tmm`A`
// (the tile intrinsics take register numbers as literals).
#define AWQ_AMX_K_STEP(A)                       \
  _tile_loadd(A, a0, k_step);                   \
  _tile_loadd(6, b0, 64);                       \
  _tile_dpbssd(0, A, 6);                        \
  if (nb > 1) {                                 \
    _tile_loadd(7, b0 + b_tile, 64);            \
    _tile_dpbssd(1, A, 7);                      \
  }                                             \
  if (nb > 2) {                                 \
    _tile_loadd(6, b0 + 2 * b_tile, 64);        \
    _tile_dpbssd(2, A, 6);                      \
  }                                             \
  if (nb > 3) {                                 \
    _tile_loadd(7, b0 + 3 * b_tile, 64);        \
    _tile_dpbssd(3, A, 7);                      \
  }

// All Mp rows (a multiple of 16; rows past M are zero activations) x one block of nb tiles,
// over all of K, into acc [Mp][kBlockTiles * kTileN] (written, not added to). Needs
// amx_configure(k_step) on this thread. at: the activations as A tiles
// (amx_tile_activations); bt: 16 * Gp * nb bytes of B tiles; cbuf: four C tiles; s: two
// sets of kBlockTiles scales.
//
// Per group the block is decoded into B tiles once; then each row tile loads its A tile
// once per k-step and multiplies it with every channel tile of the block (C in tmm0-3, A
// in tmm4-5, B in tmm6-7). The fp32 scaling of the previous row tile comes after the next
// row tile's tdpbssd in program order, so the vector units can scale while the tile unit
// multiplies.
void block_amx(const uint8_t* __restrict wq, const c10::Half* __restrict ws,
               const uint8_t* __restrict wz, const int8_t* __restrict at,
               const float* __restrict sa, const Problem& p, int64_t Mp, int64_t nb,
               int64_t k_step, int8_t* __restrict bt, int32_t* __restrict cbuf,
               __m512* __restrict s, float* __restrict acc) {
  constexpr int64_t kAccStride = kBlockTiles * kTileN;
  constexpr int64_t kTile = kAmxRows * kTileN;
  static_assert(kBlockTiles == 4, "the tile loop below names four C tiles");
  const int64_t k8n = p.Gp / 8;
  const int64_t k_steps = p.Gp / k_step;
  const int64_t b_tile = k_step / 4 * 64;
  const int64_t m_tiles = Mp / kAmxRows;
  const int64_t a_tile = kAmxRows * p.Kp;  // bytes between two row tiles of one k-step

  AmxPending pending;
  for (int64_t g = 0; g < p.NG; ++g) {
    amx_decode_group(wq + g * k8n * nb * 64, wz + g * nb * kTileN, nb, k8n, k_step, bt);
    __m512* sg = s + (g % 2) * kBlockTiles;  // the pending row tile may still need group g - 1's
    for (int64_t t = 0; t < nb; ++t)
      sg[t] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + (g * nb + t) * kTileN)));
    const int8_t* ag = at + g * p.Gp * kAmxRows;
    for (int64_t mt = 0; mt < m_tiles; ++mt) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t ks = 0; ks < k_steps; ++ks) {
        const int8_t* a0 = ag + mt * a_tile + ks * kAmxRows * k_step;
        const int8_t* b0 = bt + ks * nb * b_tile;
        // A load into a tile register has to wait for the multiplies still reading it.
        // Successive A loads alternate between tmm4 and tmm5 and B loads between tmm6 and
        // tmm7, so a load waits for a multiply issued two or more steps earlier, never for
        // the one just before (measured 2-5% faster than one A register and three B).
        if (((mt * k_steps + ks) & 1) == 0) {
          AWQ_AMX_K_STEP(4)
        } else {
          AWQ_AMX_K_STEP(5)
        }
      }
      if (pending.tiles > 0) amx_scale_pending(pending, cbuf, p.NG);
      _tile_stored(0, cbuf, 64);
      if (nb > 1) _tile_stored(1, cbuf + kTile, 64);
      if (nb > 2) _tile_stored(2, cbuf + 2 * kTile, 64);
      if (nb > 3) _tile_stored(3, cbuf + 3 * kTile, 64);
      pending.tiles = nb;
      pending.s = sg;
      pending.sa = sa + mt * kAmxRows * p.NG + g;
      pending.y = acc + mt * kAmxRows * kAccStride;
      pending.first = g == 0;
    }
  }
  if (pending.tiles > 0) amx_scale_pending(pending, cbuf, p.NG);
}

#endif  // AWQ_HAVE_AMX

#if AWQ_HAVE_AVX512_VNNI
// 16 fp32 values to y's dtype under `mask`, rounded as c10's scalar conversions round them
// (to nearest even; a bf16 NaN becomes 0x7FC0), so both paths below store the same bits.
inline void store16(float* out, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(out, mask, v); }
inline void store16(c10::Half* out, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(out, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(c10::BFloat16* out, __m512 v, __mmask16 mask) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(out, mask, _mm512_cvtepi32_epi16(rounded));
}
#endif

// Adds bias and writes `rows` rows of one block's fp32 results to y.
template <typename scalar_t>
void store_block(const float* acc, const float* bias, const Problem& p, int64_t m0, int64_t rows,
                 int64_t n0, int64_t nb, scalar_t* y) {
  const int64_t n_end = std::min(p.N, n0 + nb * kTileN);
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = acc + r * kBlockTiles * kTileN;
    scalar_t* out = y + (m0 + r) * p.N;
#if AWQ_HAVE_AVX512_VNNI
    for (int64_t n = n0; n < n_end; n += kTileN) {
      const __mmask16 mask = tail_mask(n_end - n);
      __m512 v = _mm512_maskz_loadu_ps(mask, a + (n - n0));
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n));
      store16(out + n, v, mask);
    }
#else
    for (int64_t n = n0; n < n_end; ++n) {
      const float v = a[n - n0] + (bias != nullptr ? bias[n] : 0.f);
      out[n] = static_cast<scalar_t>(v);
    }
#endif
  }
}

template <typename scalar_t>
void run_gemm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, const at::Tensor& wz,
              const float* bias, const Problem& p, bool generic, bool amx, at::Tensor& y) {
  // The AMX path reads whole tiles of 16 rows: rows past M are zero activations with scale 0.
  const int64_t Mp = amx ? (p.M + 15) / 16 * 16 : p.M;
  auto aq = at::empty({Mp, p.Kp}, x.options().dtype(at::kChar));
  auto sa = at::empty({Mp, p.NG}, x.options().dtype(at::kFloat));
  auto suma = at::empty({Mp, p.NG}, x.options().dtype(at::kInt));
  if (Mp > p.M) {
    aq.narrow(0, p.M, Mp - p.M).zero_();
    sa.narrow(0, p.M, Mp - p.M).zero_();
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  int8_t* aqp = aq.data_ptr<int8_t>();
  float* sap = sa.data_ptr<float>();
  int32_t* sump = suma.data_ptr<int32_t>();

  // Rows are independent; a grain keeps tiny M on one thread.
  const int64_t row_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.K, 1));
  at::parallel_for(0, p.M, row_grain, [&](int64_t m0, int64_t m1) {
#if AWQ_HAVE_AVX512_VNNI
    if (!generic) return quantize_rows_avx512(xp, p, m0, m1, aqp, sap, sump);
#endif
    quantize_rows_generic(xp, p, m0, m1, aqp, sap, sump);
  });

  const uint8_t* wqp = wq.data_ptr<uint8_t>();
  const c10::Half* wsp = ws.data_ptr<c10::Half>();
  const uint8_t* wzp = wz.data_ptr<uint8_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t tile_bytes = p.NG * p.Gp * kTileN / 2;
  const int64_t tile_meta = p.NG * kTileN;

  // Blocks are handed out dynamically: the machine is shared, and with a static
  // split one descheduled thread would hold up the whole call.
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.blocks));
  // With several chunks of rows, the first pass over a block reads it from DRAM
  // and the others compute from L2 while DRAM idles. A single worker knows its
  // next block (b + 1), so the second pass streams that block into L2 and the
  // next first pass finds it there: memory overlaps compute (M = 16: the M = 1
  // time no longer adds to the compute time). With several workers the next
  // block may go to another core, so they keep the plain prefetch.
  const bool prefetch_next = workers == 1 && p.M > kMaxRows;
#if AWQ_HAVE_AMX
  if (amx) {
    const int64_t k_step = amx_k_step(p.Gp);
    auto tiled = at::empty({Mp * p.Kp}, aq.options());
    int8_t* atp = tiled.data_ptr<int8_t>();
    amx_tile_activations(aqp, Mp, p.Kp, k_step, atp);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      amx_configure(k_step);
      std::vector<int8_t> bt(16 * p.Gp * kBlockTiles);
      alignas(64) int32_t cbuf[4 * kAmxRows * kTileN];
      __m512 scales[2 * kBlockTiles];
      std::vector<float> acc(Mp * kBlockTiles * kTileN);
      for (int64_t b; (b = next_block.fetch_add(1, std::memory_order_relaxed)) < p.blocks;) {
        const int64_t t0 = b * kBlockTiles;
        const int64_t nb = std::min(kBlockTiles, p.tiles - t0);
        block_amx(wqp + t0 * tile_bytes, wsp + t0 * tile_meta, wzp + t0 * tile_meta, atp, sap, p, Mp,
                  nb, k_step, bt.data(), cbuf, scales, acc.data());
        store_block(acc.data(), bias, p, 0, p.M, t0 * kTileN, nb, yp);
      }
      _tile_release();
    });
    return;
  }
#endif
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    alignas(64) float acc[kMaxRows * kBlockTiles * kTileN];
    for (int64_t b; (b = next_block.fetch_add(1, std::memory_order_relaxed)) < p.blocks;) {
      const int64_t t0 = b * kBlockTiles;
      const int64_t nb = std::min(kBlockTiles, p.tiles - t0);
      const uint8_t* wqb = wqp + t0 * tile_bytes;
      const c10::Half* wsb = wsp + t0 * tile_meta;
      const uint8_t* wzb = wzp + t0 * tile_meta;
      for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, p.M - m0);
#if AWQ_HAVE_AVX512_VNNI
        if (!generic) {
          const bool streams_next = prefetch_next && m0 == kMaxRows && b + 1 < p.blocks;
          const int64_t next_block = streams_next ? nb * tile_bytes : 0;
          block_avx512_dispatch(rows, nb, wqb, wsb, wzb, aqp, sap, sump, p, m0, next_block, acc);
          store_block(acc, bias, p, m0, rows, t0 * kTileN, nb, yp);
          continue;
        }
#endif
        block_generic(wqb, wsb, wzb, aqp, sap, sump, p, nb, m0, rows, acc);
        store_block(acc, bias, p, m0, rows, t0 * kTileN, nb, yp);
      }
    }
  });
}

}  // namespace

bool awq_amx_ready() {
#if AWQ_HAVE_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// x: [M, K] fp32/bf16/fp16, contiguous. wq/ws/wz: the repacked weight (see top).
// bias: optional fp32 [N]. generic: the plain-loop path. amx: the AMX path (the caller
// chooses it by M, see kernels.cpu_path_for; it must be ready here, see amx_ready).
// Returns y: [M, N] in x's dtype.
at::Tensor awq_gemm_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws,
                        const at::Tensor& wz, int64_t group_size, int64_t out_features,
                        const c10::optional<at::Tensor>& bias, bool generic, bool amx) {
  const int64_t K = awq_cpu::check_gemm_args(x, wq, ws, wz, at::kHalf, "fp16", group_size);
  const Problem p = awq_cpu::make_tiled_problem(x.size(0), out_features, K, group_size, kTileN, kBlockTiles);
  TORCH_CHECK(wq.numel() == p.tiles * p.NG * p.Gp * kTileN / 2, "wq size does not match K, N, group_size");
  awq_cpu::check_meta_size(ws, wz, p.tiles * p.NG * kTileN);
  TORCH_CHECK(!(generic && amx), "generic and amx are two different paths; ask for one");
  TORCH_CHECK(!amx || awq_amx_ready(), "the AMX path needs AMX-INT8 tiles and the kernel's permission to use them");
  at::Tensor bias_f;
  const float* bias_ptr = awq_cpu::bias_as_float(bias, out_features, bias_f);
  at::Tensor y = at::empty({p.M, p.N}, x.options());
  if (p.M == 0) return y;
  awq_cpu::dispatch_activation_dtype(x.scalar_type(), [&](auto zero) {
    run_gemm<decltype(zero)>(x, wq, ws, wz, bias_ptr, p, generic, amx, y);
  });
  return y;
}

bool awq_has_avx512_vnni() { return AWQ_HAVE_AVX512_VNNI; }

int64_t awq_block_tiles() { return kBlockTiles; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("awq_gemm_cpu", &awq_gemm_cpu, "AWQ int4 GEMM on the repacked CPU layout", py::arg("x"),
        py::arg("wq"), py::arg("ws"), py::arg("wz"), py::arg("group_size"), py::arg("out_features"),
        py::arg("bias") = py::none(), py::arg("generic") = false, py::arg("amx") = false);
  m.def("has_avx512_vnni", &awq_has_avx512_vnni, "whether the AVX-512 VNNI path was compiled in");
  m.def("amx_ready", &awq_amx_ready,
        "whether the AMX path runs here: compiled in, and Linux granted the tile state");
  m.def("block_tiles", &awq_block_tiles, "tiles of 16 output channels per weight block");
}

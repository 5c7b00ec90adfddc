// The exact products by a GGUF's Q4_1 and Q8_0 weights, y[rows][N] = x[rows][K] @ w, for one
// instruction set (this file is compiled once per set: RIVER_AVX512 or AVX2 + FMA + F16C, see build.py).
//
// Q4_1: w[k][n] = d * q + m per block of 32 inputs k, q in 0..15, d and m fp16; each weight is made in
// fp32 as fmadd(d, q, m). Q8_0: w = d * q, q in -127..127, d fp16. Either way the weight is bit-identical
// to the fp32 weight the export holds (d * q is exact for an fp16 d and a 4- or 8-bit q). Each column sums
// every block of 32 inputs as one FMA chain in order and adds the blocks' sums in order: the result does
// not depend on the instruction set or the thread count.
//
// Layouts (made by compiler/lowering/q41_matmul.py and q80_matmul.py), by groups of 32 output columns:
//   Q4_1 q [N/32][K][16] bytes: byte j of row k holds column j (low nibble) and column 16 + j (high);
//   Q8_0 q [N/32][K][32] int8;  d (and m) [N/32][K/32][32] fp16.
// A step of a few rows dequantizes each weight vector once as it streams by and uses it for every row;
// a step of more rows (prefill) dequantizes a group's weights once into a buffer and runs all rows over it.
// Also here, inexact on purpose: the Q4_1 product by int8 activations of River's twins (i8_tile).

#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace {

#ifdef RIVER_AVX512
using vec = __m512;
constexpr int VW = 16;  // floats a vector
constexpr int MAX_ROWS = 8;
inline vec zero() { return _mm512_setzero_ps(); }
inline vec bcast(float v) { return _mm512_set1_ps(v); }
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec halves(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
// the 32 levels of one group row (16 bytes) as two vectors: columns 0-15, 16-31
inline void levels(const uint8_t* p, vec out[2]) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
// the 32 signed levels of one Q8_0 group row (32 bytes): columns 0-15, 16-31
inline void levels8(const int8_t* p, vec out[2]) {
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
}
inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
// int8 activations: one quad (4 inputs x 32 columns, 64 bytes, see i8_tile) as V vectors of 4
// levels a lane; dot adds each lane's 4 products by the row's 4 inputs
using ivec = __m512i;
inline ivec izero() { return _mm512_setzero_si512(); }
inline void quad(const uint8_t* p, ivec out[2]) {
  __m512i b = _mm512_loadu_si512(p), low = _mm512_set1_epi8(15);
  out[0] = _mm512_and_si512(b, low);
  out[1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
}
inline ivec bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}
inline ivec dot(ivec acc, ivec w, ivec x) { return _mm512_dpbusd_epi32(acc, w, x); }
inline vec to_float(ivec v) { return _mm512_cvtepi32_ps(v); }
inline float abs_max(const float* p) {  // of 32 values
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(p)), _mm512_abs_ps(_mm512_loadu_ps(p + 16))));
}
// 32 values times inv, rounded to nearest even (the default rounding), as int8; returns their sum
inline int32_t round_to_int8(const float* p, float inv, int8_t* q) {
  __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(inv)));
  __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p + 16), _mm512_set1_ps(inv)));
  _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(a));
  _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(b));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
}
#define RIVER_Q41 q41_columns_avx512
#define RIVER_Q41I8 q41i8_columns_avx512
#define RIVER_QUANTIZE quantize_rows_avx512
#define RIVER_Q80 q80_columns_avx512
#else
using vec = __m256;
constexpr int VW = 8;
constexpr int MAX_ROWS = 4;  // 16 registers: some accumulators spill, still faster than 3 rows (measured)
inline vec zero() { return _mm256_setzero_ps(); }
inline vec bcast(float v) { return _mm256_set1_ps(v); }
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec halves(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
// columns 0-7, 8-15, 16-23, 24-31
inline void levels(const uint8_t* p, vec out[4]) {
  __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
  __m256i low_bits = _mm256_set1_epi32(15);
  out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, low_bits));
  out[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, low_bits));
  out[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
  out[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
}
inline void levels8(const int8_t* p, vec out[4]) {
  for (int j = 0; j < 4; j++)
    out[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * j))));
}
inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
using ivec = __m256i;
inline ivec izero() { return _mm256_setzero_si256(); }
// lanes 0-7 (columns 0-7 low, 16-23 high), then lanes 8-15: columns 0-7, 8-15, 16-23, 24-31
inline void quad(const uint8_t* p, ivec out[4]) {
  __m256i a = _mm256_loadu_si256((const __m256i*)p), b = _mm256_loadu_si256((const __m256i*)(p + 32));
  __m256i low = _mm256_set1_epi8(15);
  out[0] = _mm256_and_si256(a, low);
  out[1] = _mm256_and_si256(b, low);
  out[2] = _mm256_and_si256(_mm256_srli_epi16(a, 4), low);
  out[3] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
}
inline ivec bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}
// levels 0..15 by int8: the pairs' int16 sums cannot saturate (2 x 15 x 127)
inline ivec dot(ivec acc, ivec w, ivec x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
inline vec to_float(ivec v) { return _mm256_cvtepi32_ps(v); }
inline float abs_max(const float* p) {
  __m256 sign = _mm256_set1_ps(-0.0f), m = _mm256_setzero_ps();
  for (int v = 0; v < 4; v++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + 8 * v)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}
inline int32_t round_to_int8(const float* p, float inv, int8_t* q) {
  alignas(32) int32_t r[32];
  for (int v = 0; v < 4; v++)
    _mm256_store_si256((__m256i*)(r + 8 * v), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 8 * v), _mm256_set1_ps(inv))));
  int32_t sum = 0;
  for (int i = 0; i < 32; i++) {
    q[i] = (int8_t)r[i];
    sum += r[i];
  }
  return sum;
}
#define RIVER_Q41 q41_columns_avx2
#define RIVER_Q41I8 q41i8_columns_avx2
#define RIVER_QUANTIZE quantize_rows_avx2
#define RIVER_Q80 q80_columns_avx2
#endif

constexpr int GROUP = 32, BLOCK = 32, V = GROUP / VW;  // V vectors a group of columns

// The weights of groups g..g+G, made from the Q4_1 form as they are used: per block of inputs its
// scales and offsets, per input the V*G vectors of dequantized weights
template <int G>
struct Q41Weights {
  const Product& p;
  int64_t g;
  vec dv[G * V], mv[G * V];
  void block(int64_t b) {
    for (int c = 0; c < G; c++)
      for (int v = 0; v < V; v++) {
        int64_t at = ((g + c) * (p.K / BLOCK) + b) * GROUP + v * VW;
        dv[c * V + v] = halves(p.d + at);
        mv[c * V + v] = halves(p.m + at);
      }
  }
  void at(int64_t i, vec* w) {
    for (int c = 0; c < G; c++) {
      levels(p.q + ((g + c) * p.K + i) * (GROUP / 2), w + c * V);
      for (int v = 0; v < V; v++) w[c * V + v] = fma(dv[c * V + v], w[c * V + v], mv[c * V + v]);
    }
  }
};

// The same for the Q8_0 form: w = d * q
template <int G>
struct Q80Weights {
  const Product& p;
  int64_t g;
  vec dv[G * V];
  void block(int64_t b) {
    for (int c = 0; c < G; c++)
      for (int v = 0; v < V; v++) dv[c * V + v] = halves(p.d + ((g + c) * (p.K / BLOCK) + b) * GROUP + v * VW);
  }
  void at(int64_t i, vec* w) {
    for (int c = 0; c < G; c++) {
      levels8(reinterpret_cast<const int8_t*>(p.q) + ((g + c) * p.K + i) * GROUP, w + c * V);
      for (int v = 0; v < V; v++) w[c * V + v] = mul(dv[c * V + v], w[c * V + v]);
    }
  }
};

// One group's weights dequantized once into [K][32] floats (steps of many rows: prefill)
struct Cached {
  const float* w;
  void block(int64_t) {}
  void at(int64_t i, vec* out) {
    for (int v = 0; v < V; v++) out[v] = load(w + i * GROUP + v * VW);
  }
};

// rows r0..r0+M of groups g..g+G: M x G*V accumulators; each block of 32 inputs is summed as one FMA
// chain in order, then added to the column's total (two levels: the rounding error grows with
// 32 + K/32 terms, not K, and stays within what fp32 MatMul kernels leave)
template <int M, int G, class Weights>
void tile(const Product& p, Weights& weights, int64_t r0, int64_t g) {
  const int64_t K = p.K, N = p.N, blocks = K / BLOCK;
  vec total[M][G * V];
  for (int r = 0; r < M; r++)
    for (int j = 0; j < G * V; j++) total[r][j] = zero();
  for (int64_t b = 0; b < blocks; b++) {
    vec acc[M][G * V];
    for (int r = 0; r < M; r++)
      for (int j = 0; j < G * V; j++) acc[r][j] = zero();
    weights.block(b);
    for (int64_t i = b * BLOCK; i < (b + 1) * BLOCK; i++) {
      vec w[G * V];
      weights.at(i, w);
      for (int r = 0; r < M; r++) {
        vec xv = bcast(p.x[(r0 + r) * K + i]);
        for (int j = 0; j < G * V; j++) acc[r][j] = fma(xv, w[j], acc[r][j]);
      }
    }
    for (int r = 0; r < M; r++)
      for (int j = 0; j < G * V; j++) total[r][j] = add(total[r][j], acc[r][j]);
  }
  for (int r = 0; r < M; r++)
    for (int j = 0; j < G * V; j++) store(p.y + (r0 + r) * N + g * GROUP + j * VW, total[r][j]);
}

// groups g0..g1 in passes of G groups, the rest one a pass: run(integral_constant<G or 1>, first group)
template <int G, class Run>
void by_groups(int64_t g0, int64_t g1, Run run) {
  int64_t g = g0;
  for (; g + G <= g1; g += G) run(std::integral_constant<int, G>{}, g);
  for (; g < g1; g++) run(std::integral_constant<int, 1>{}, g);
}

// groups g0..g1 for rows r0..r0+M, weights streamed: several groups a pass where the registers allow it
// (AVX-512, one row: four groups, eight independent FMA chains; ~10% faster than two, measured)
template <template <int> class Weights, int M>
void streamed(const Product& p, int64_t r0, int64_t g0, int64_t g1) {
  constexpr int G = (V == 2 && M == 1) ? 4 : (M * V <= 4) ? 2 : 1;
  by_groups<G>(g0, g1, [&](auto n, int64_t g) {
    Weights<decltype(n)::value> weights{p, g};
    tile<M, decltype(n)::value>(p, weights, r0, g);
  });
}

template <int M>
void cached(const Product& p, const float* w, int64_t r0, int64_t g) {
  Cached weights{w};
  tile<M, 1>(p, weights, r0, g);
}

// rows r0..r0+m (m <= M) by the variant of tile made for exactly m rows
template <int M, class Run>
void by_rows(int64_t m, Run run) {
  if constexpr (M > 1) {
    if (m < M) return by_rows<M - 1>(m, run);
  }
  run(std::integral_constant<int, M>{});
}

template <template <int> class Weights>
void columns(const Product& p, int64_t g0, int64_t g1) {
  auto chunk = [&](int64_t r0) { return p.rows - r0 < MAX_ROWS ? p.rows - r0 : MAX_ROWS; };
  if (p.rows <= MAX_ROWS) {  // one pass over the weights: dequantize them as they stream by
    by_rows<MAX_ROWS>(p.rows, [&](auto m) { streamed<Weights, decltype(m)::value>(p, 0, g0, g1); });
    return;
  }
  // several passes: each group's weights dequantized once (the same values, so the same sums)
  thread_local std::vector<float> w;
  w.resize(p.K * GROUP);
  for (int64_t g = g0; g < g1; g++) {
    Weights<1> source{p, g};
    for (int64_t b = 0; b < p.K / BLOCK; b++) {
      source.block(b);
      for (int64_t i = b * BLOCK; i < (b + 1) * BLOCK; i++) {
        vec row[V];
        source.at(i, row);
        for (int v = 0; v < V; v++) store(w.data() + i * GROUP + v * VW, row[v]);
      }
    }
    for (int64_t r0 = 0; r0 < p.rows; r0 += MAX_ROWS)
      by_rows<MAX_ROWS>(chunk(r0), [&](auto m) { cached<decltype(m)::value>(p, w.data(), r0, g); });
  }
}

// Q4_1 weights by int8 activations (Q41MatMulInt8): x is quantized per row and block of 32 inputs
// (river_ops.cpp: x ~ s * xq, xq in -127..127), so a block's sums are exact integers,
// I = sum q * xq and S = sum xq, and each block adds s * (d * I + m * S) to its column, blocks in order.
// Layout of q: [N/32][K/4][64] bytes, a quad of 4 inputs x 32 columns; byte 4 j + t holds input t of
// column j (low nibble) and of column 16 + j (high). Rows are run 4 at a time over the streamed weights.
constexpr int I8_ROWS = 4;

template <int M, int G>
void i8_tile(const Product& p, int64_t r0, int64_t g) {
  const int64_t K = p.K, N = p.N, blocks = K / BLOCK;
  vec total[M][G * V];
  for (int r = 0; r < M; r++)
    for (int j = 0; j < G * V; j++) total[r][j] = zero();
  for (int64_t b = 0; b < blocks; b++) {
    ivec acc[M][G * V];
    for (int r = 0; r < M; r++)
      for (int j = 0; j < G * V; j++) acc[r][j] = izero();
    for (int t = 0; t < BLOCK / 4; t++) {
      ivec w[G * V];
      for (int c = 0; c < G; c++) quad(p.q + (g + c) * K * (GROUP / 2) + (b * (BLOCK / 4) + t) * 64, w + c * V);
      for (int r = 0; r < M; r++) {
        ivec xv = bcast4(p.xq + (r0 + r) * K + b * BLOCK + t * 4);
        for (int j = 0; j < G * V; j++) acc[r][j] = dot(acc[r][j], w[j], xv);
      }
    }
    for (int r = 0; r < M; r++) {
      vec s = bcast(p.xs[(r0 + r) * blocks + b]), sum = bcast((float)p.xsum[(r0 + r) * blocks + b]);
      for (int c = 0; c < G; c++)
        for (int v = 0; v < V; v++) {
          int64_t at = ((g + c) * blocks + b) * GROUP + v * VW;
          vec inner = fma(halves(p.m + at), sum, mul(halves(p.d + at), to_float(acc[r][c * V + v])));
          total[r][c * V + v] = fma(s, inner, total[r][c * V + v]);
        }
    }
  }
  for (int r = 0; r < M; r++)
    for (int j = 0; j < G * V; j++) store(p.y + (r0 + r) * N + g * GROUP + j * VW, total[r][j]);
}

// groups g0..g1 for rows r0..r0+M; one row takes several groups a pass (independent chains)
template <int M>
void i8_rows(const Product& p, int64_t r0, int64_t g0, int64_t g1) {
  by_groups<M == 1 ? 8 / V : 1>(g0, g1, [&](auto n, int64_t g) { i8_tile<M, decltype(n)::value>(p, r0, g); });
}

}  // namespace

// x [blocks][32] as int8 per block (see i8_tile): xq = round-to-nearest-even(x * (127 / a)), scale a / 127
// and the sum of xq, a = the block's max |x| (an all-zero block: scale 0). |x * (127 / a)| <= 127 (to
// the rounding of the product, which stays below 127.5), so no value saturates.
void RIVER_QUANTIZE(const float* x, int64_t blocks, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t b = 0; b < blocks; b++) {
    float a = abs_max(x + b * 32);
    sum[b] = round_to_int8(x + b * 32, a > 0.0f ? 127.0f / a : 0.0f, q + b * 32);
    scale[b] = a / 127.0f;
  }
}

void RIVER_Q41I8(const Product& p, int64_t g0, int64_t g1) {
  for (int64_t r0 = 0; r0 < p.rows; r0 += I8_ROWS)
    by_rows<I8_ROWS>(p.rows - r0 < I8_ROWS ? p.rows - r0 : I8_ROWS, [&](auto m) { i8_rows<decltype(m)::value>(p, r0, g0, g1); });
}
void RIVER_Q41(const Product& p, int64_t g0, int64_t g1) { columns<Q41Weights>(p, g0, g1); }
void RIVER_Q80(const Product& p, int64_t g0, int64_t g1) { columns<Q80Weights>(p, g0, g1); }

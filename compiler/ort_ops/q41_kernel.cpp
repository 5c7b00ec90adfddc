// The exact Q4_1 product, y[rows][N] = x[rows][K] @ w, for one instruction set (this file is compiled
// once per set: RIVER_AVX512 or AVX2 + FMA + F16C, see build.py).
//
// w[k][n] = d * q + m per block of 32 inputs k: q in 0..15, d and m fp16 (a GGUF's Q4_1 block). Each
// weight is made in fp32 as fmadd(d, q, m), bit-identical to the fp32 weight the export holds (d * q is
// exact for an fp16 d and a 4-bit q); each column sums every block of 32 inputs as one FMA chain in order
// and adds the blocks' sums in order: the result does not depend on the instruction set or the thread count.
//
// Layout (made by compiler/lowering/q41_matmul.py), by groups of 32 output columns:
//   q [N/32][K][16] bytes: byte j of row k holds column j (low nibble) and column 16 + j (high);
//   d, m [N/32][K/32][32] fp16.
// Every dequantized weight vector serves all rows of a chunk (up to 8 rows at a time).

#include <immintrin.h>

#include "q41_kernel.h"

namespace {

#ifdef RIVER_AVX512
using vec = __m512;
constexpr int VW = 16;  // floats a vector
constexpr int MAX_ROWS = 8;
inline vec zero() { return _mm512_setzero_ps(); }
inline vec bcast(float v) { return _mm512_set1_ps(v); }
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
#define RIVER_COLUMNS q41_columns_avx512
#else
using vec = __m256;
constexpr int VW = 8;
constexpr int MAX_ROWS = 4;  // 16 registers: some accumulators spill, still faster than 3 rows (measured)
inline vec zero() { return _mm256_setzero_ps(); }
inline vec bcast(float v) { return _mm256_set1_ps(v); }
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
#define RIVER_COLUMNS q41_columns_avx2
#endif

constexpr int GROUP = 32, BLOCK = 32, V = GROUP / VW;  // V vectors a group of columns

// rows r0..r0+M of groups g..g+G: M x G*V accumulators; each block of 32 inputs is summed as one FMA
// chain in order, then added to the column's total (two levels: the rounding error grows with
// 32 + K/32 terms, not K, and stays within what fp32 MatMul kernels leave)
template <int M, int G>
void tile(const Q41Product& p, int64_t r0, int64_t g) {
  const int64_t K = p.K, N = p.N, blocks = K / BLOCK;
  vec total[M][G * V];
  for (int r = 0; r < M; r++)
    for (int j = 0; j < G * V; j++) total[r][j] = zero();
  for (int64_t b = 0; b < blocks; b++) {
    vec acc[M][G * V];
    for (int r = 0; r < M; r++)
      for (int j = 0; j < G * V; j++) acc[r][j] = zero();
    vec dv[G * V], mv[G * V];
    for (int c = 0; c < G; c++)
      for (int v = 0; v < V; v++) {
        int64_t at = ((g + c) * blocks + b) * GROUP + v * VW;
        dv[c * V + v] = halves(p.d + at);
        mv[c * V + v] = halves(p.m + at);
      }
    for (int64_t i = b * BLOCK; i < (b + 1) * BLOCK; i++) {
      vec w[G * V];
      for (int c = 0; c < G; c++) {
        levels(p.q + ((g + c) * K + i) * (GROUP / 2), w + c * V);
        for (int v = 0; v < V; v++) w[c * V + v] = fma(dv[c * V + v], w[c * V + v], mv[c * V + v]);
      }
      for (int r = 0; r < M; r++) {
        vec xv = bcast(p.x[(r0 + r) * K + i]);
        for (int j = 0; j < G * V; j++) acc[r][j] = fma(xv, w[j], acc[r][j]);
      }
    }
    for (int r = 0; r < M; r++)
      for (int j = 0; j < G * V; j++) total[r][j] = add(total[r][j], acc[r][j]);
  }
  for (int r = 0; r < M; r++)
    for (int c = 0; c < G; c++)
      for (int v = 0; v < V; v++) store(p.y + (r0 + r) * N + (g + c) * GROUP + v * VW, total[r][c * V + v]);
}

// groups g0..g1 for rows r0..r0+M: two groups a pass where the registers allow it
template <int M>
void rows(const Q41Product& p, int64_t r0, int64_t g0, int64_t g1) {
  constexpr int G = (M * V <= 4) ? 2 : 1;
  int64_t g = g0;
  for (; g + G <= g1; g += G) tile<M, G>(p, r0, g);
  for (; g < g1; g++) tile<M, 1>(p, r0, g);
}

template <int M>
void dispatch(const Q41Product& p, int64_t r0, int64_t m, int64_t g0, int64_t g1) {
  if constexpr (M > 1) {
    if (m < M) return dispatch<M - 1>(p, r0, m, g0, g1);
  }
  rows<M>(p, r0, g0, g1);
}

}  // namespace

void RIVER_COLUMNS(const Q41Product& p, int64_t g0, int64_t g1) {
  for (int64_t r0 = 0; r0 < p.rows; r0 += MAX_ROWS) {
    int64_t m = p.rows - r0 < MAX_ROWS ? p.rows - r0 : MAX_ROWS;
    dispatch<MAX_ROWS>(p, r0, m, g0, g1);
  }
}

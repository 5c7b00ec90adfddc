// Exact Q4_1 product on the CPU, standalone: how fast an ONNX Runtime custom op of our own could run a
// GGUF's Q4_1 weights in fp32, against what the ort-grid lowering uses today (MatMulNBits at accuracy
// level 1 plus the offset path: SmolLM2's 576 x 3072 gate|up product, one row, ~124 + ~17 us on the
// project's 2-core Xeon VM; 8 rows ~508 us).
//
// Each weight is made as fmadd(d, q, m) in fp32, which is bit-identical to the fp32 weight the export
// holds (d * q is exact for a 4-bit q and an fp16 d), then multiplied into the accumulators: only the
// summation order differs from an fp32 MatMul. Weights are repacked by groups of W columns (one
// vector), one byte per q: q [N/W][K][W], d and m [N/W][K/32][W]; each dequantized vector serves every
// row of the step. Checked against a scalar loop; timed for 1, 2, 4 and 8 rows on 1 and 2 threads
// (a persistent OpenMP team, as ONNX Runtime's pool would be).
//
//   g++ -O3 -mavx512f -mavx512bw -mfma -fopenmp benchmarks/q41_kernel.cpp -o /tmp/q41 && /tmp/q41
//   g++ -O3 -mavx2 -mfma -fopenmp benchmarks/q41_kernel.cpp -o /tmp/q41 && /tmp/q41   (AVX2 machines)
//
// Measured 2026-12-06 (Xeon VM, AVX-512, N = 3072; the VM's speed moved 30% between runs, and the
// MatMulNBits figures above come from another run): 1 thread 85-98 us (1 row) / 234-328 us (8 rows);
// 2 threads 44-61 / 121-169 us (one run beside MatMulNBits acc 1: 49 / 166 us against 104 / 374-390
// us). AVX2: 1 thread 121-168 / 719-745 us, 2 threads 63 / 279 us. Not yet
// an ONNX Runtime op: the headers it needs ship in the npm package com.github.asus4.onnxruntime.

#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#ifdef __AVX512F__
using vec = __m512;
static const int W = 16;
static inline vec zero() { return _mm512_setzero_ps(); }
static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
static inline vec bcast(float v) { return _mm512_set1_ps(v); }
static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec levels(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
#else
using vec = __m256;
static const int W = 8;
static inline vec zero() { return _mm256_setzero_ps(); }
static inline vec load(const float* p) { return _mm256_loadu_ps(p); }
static inline vec bcast(float v) { return _mm256_set1_ps(v); }
static inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec levels(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
#endif

static const int K = 576, N = 3072, BLOCK = 32, GROUPS = 4;  // GROUPS column groups a pass: independent FMA chains

// y[M][N] = x[M][K] @ w, w[k][n] = d * q + m per block of 32 k; columns of groups g0..g1
template <int M>
static void product(const float* x, const uint8_t* q, const float* d, const float* m, float* y, int g0, int g1) {
  for (int g = g0; g < g1; g += GROUPS) {
    vec acc[M][GROUPS];
    for (int r = 0; r < M; r++)
      for (int c = 0; c < GROUPS; c++) acc[r][c] = zero();
    for (int b = 0; b < K / BLOCK; b++) {
      vec dv[GROUPS], mv[GROUPS];
      for (int c = 0; c < GROUPS; c++) {
        dv[c] = load(d + ((size_t)(g + c) * (K / BLOCK) + b) * W);
        mv[c] = load(m + ((size_t)(g + c) * (K / BLOCK) + b) * W);
      }
      for (int i = b * BLOCK; i < (b + 1) * BLOCK; i++) {
        vec w[GROUPS];
        for (int c = 0; c < GROUPS; c++) w[c] = fma(dv[c], levels(q + ((size_t)(g + c) * K + i) * W), mv[c]);
        for (int r = 0; r < M; r++) {
          vec xv = bcast(x[r * K + i]);
          for (int c = 0; c < GROUPS; c++) acc[r][c] = fma(xv, w[c], acc[r][c]);
        }
      }
    }
    for (int r = 0; r < M; r++)
      for (int c = 0; c < GROUPS; c++) store(y + (size_t)r * N + (g + c) * W, acc[r][c]);
  }
}

template <int M>
static double micros(const float* x, const uint8_t* q, const float* d, const float* m, float* y, int threads, int reps) {
  auto run = [&]() {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int part = 0; part < threads; part++) {
      int groups = N / W / GROUPS;  // whole passes per thread
      product<M>(x, q, d, m, y, part * groups / threads * GROUPS, (part + 1) * groups / threads * GROUPS);
    }
  };
  for (int i = 0; i < 20; i++) run();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; i++) run();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / reps;
}

int main() {
  std::vector<uint8_t> q((size_t)N * K);
  std::vector<float> d((size_t)N * K / BLOCK), m((size_t)N * K / BLOCK), x(8 * K), y(8 * N);
  srand(1);
  for (auto& v : q) v = rand() % 16;
  for (auto& v : d) v = (rand() % 1000 + 1) * 1e-5f;
  for (auto& v : m) v = -(rand() % 1000) * 1e-4f;
  for (auto& v : x) v = (rand() % 2000 - 1000) * 1e-3f;
  product<1>(x.data(), q.data(), d.data(), m.data(), y.data(), 0, N / W);
  double worst = 0;  // relative difference from a scalar loop over the same fp32 weights
  for (int j = 0; j < N; j++) {
    int g = j / W, c = j % W;
    float s = 0;
    for (int i = 0; i < K; i++) {
      size_t blk = ((size_t)g * (K / BLOCK) + i / BLOCK) * W + c;
      s += x[i] * (d[blk] * q[((size_t)g * K + i) * W + c] + m[blk]);
    }
    worst = std::fmax(worst, std::fabs(s - y[j]) / (std::fabs(s) + 1e-3));
  }
  printf("%d-wide vectors, K=%d N=%d: largest relative difference from a scalar loop %.2e\n", W, K, N, worst);
  for (int t : {1, 2}) {
    const float* xp = x.data();
    printf("%d thread(s): 1 row %.1f us, 2 rows %.1f us, 4 rows %.1f us, 8 rows %.1f us\n", t,
           micros<1>(xp, q.data(), d.data(), m.data(), y.data(), t, 2000),
           micros<2>(xp, q.data(), d.data(), m.data(), y.data(), t, 1000),
           micros<4>(xp, q.data(), d.data(), m.data(), y.data(), t, 500),
           micros<8>(xp, q.data(), d.data(), m.data(), y.data(), t, 300));
  }
  return 0;
}

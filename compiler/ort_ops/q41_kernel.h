// The exact Q4_1 product's kernels, one per instruction set (q41_kernel.cpp); river_ops.cpp picks one.
#pragma once
#include <cstdint>

struct Q41Product {
  const float* x;     // [rows][K]
  const uint8_t* q;   // [N/32][K][16]: two 4-bit levels a byte
  const uint16_t* d;  // [N/32][K/32][32] fp16 scales
  const uint16_t* m;  // [N/32][K/32][32] fp16 offsets
  float* y;           // [rows][N]
  int64_t rows, K, N;
};

// y's columns of groups g0..g1 (32 columns a group), every row
void q41_columns_avx512(const Q41Product& p, int64_t g0, int64_t g1);
void q41_columns_avx2(const Q41Product& p, int64_t g0, int64_t g1);

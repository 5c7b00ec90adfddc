// The exact products' kernels, one per weight form and instruction set (kernels.cpp); river_ops.cpp
// picks one.
#pragma once
#include <cstdint>

struct Product {
  const float* x;     // [rows][K]
  const uint8_t* q;   // Q4_1: [N/32][K][16], two 4-bit levels a byte; Q8_0: [N/32][K][32] int8
  const uint16_t* d;  // [N/32][K/32][32] fp16 scales
  const uint16_t* m;  // [N/32][K/32][32] fp16 offsets (Q4_1 only)
  float* y;           // [rows][N]
  const int8_t* xq;    // int8 activations only: x quantized [rows][K], its scales and sums [rows][K/32]
  const float* xs;
  const int32_t* xsum;
  int64_t rows, K, N;
};

// y's columns of groups g0..g1 (32 columns a group), every row
void q41_columns_avx512(const Product& p, int64_t g0, int64_t g1);
void q41_columns_avx2(const Product& p, int64_t g0, int64_t g1);
void q41i8_columns_avx512(const Product& p, int64_t g0, int64_t g1);
void q41i8_columns_avx2(const Product& p, int64_t g0, int64_t g1);
// x [blocks][32] quantized to int8 per block for the int8 products: levels, scales and sums
void quantize_rows_avx512(const float* x, int64_t blocks, int8_t* q, float* scale, int32_t* sum);
void quantize_rows_avx2(const float* x, int64_t blocks, int8_t* q, float* scale, int32_t* sum);
void q80_columns_avx512(const Product& p, int64_t g0, int64_t g1);
void q80_columns_avx2(const Product& p, int64_t g0, int64_t g1);

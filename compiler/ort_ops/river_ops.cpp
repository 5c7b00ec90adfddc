// River's ONNX Runtime custom op library, domain ai.river: exact products by a GGUF's quantized weights
// (kernels.cpp). Loaded by every session the project makes (compiler/ort_session.py) when built.
//
//   Q41MatMul(x float [..., K], q uint8 [N/32, K, 16], d float16 [N/32, K/32, 32],
//             m float16 [N/32, K/32, 32]) -> y float [..., N]        attributes K, N
//   Q80MatMul(x float [..., K], q int8 [N/32, K, 32], d float16 [N/32, K/32, 32]) -> y float [..., N]
//   Q41MatMulInt8(x, q uint8 [N/32, K/4, 64], d, m): Q4_1 weights by x quantized to int8 per row and
//             block of 32 inputs (x ~ s * xq, s = max|x| / 127, xq = round(x * 127 / max|x|)): the
//             cheap, inexact product of River's twins
//
// Columns are split into contiguous ranges, one per part, run on ONNX Runtime's own intra-op pool.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"
#include "onnxruntime_c_api.h"

namespace {

constexpr uint32_t API_NEEDED = 17;  // KernelContext_ParallelFor: ONNX Runtime 1.17
const OrtApi* api = nullptr;

enum class Isa { none, avx2, avx512 };

// The widest set this CPU runs; RIVER_OPS_ISA=avx2 picks AVX2 on an AVX-512 CPU (the tests compare the two).
// The AVX-512 kernels need BW and VNNI too (Ice Lake, Zen 4 and later); older AVX-512 CPUs run AVX2.
Isa best_isa() {
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vnni") && avx2;
  const char* asked = std::getenv("RIVER_OPS_ISA");
  if (avx512 && !(asked && std::strcmp(asked, "avx2") == 0)) return Isa::avx512;
  return avx2 ? Isa::avx2 : Isa::none;
}

using Columns = void (*)(const Product&, int64_t, int64_t);
using Quantize = void (*)(const float*, int64_t, int8_t*, float*, int32_t*);

// One weight form: its op's name and inputs, the bytes of q a weight, its kernels
struct Form {
  const char* name;
  size_t inputs;  // x, q, d (, m)
  ONNXTensorElementDataType q_type;
  int64_t q_per_weight_halves;  // bytes of q per weight, times 2 (Q4_1: 1, Q8_0: 2)
  Columns avx512, avx2;
  bool int8_activations = false;  // x quantized first (quantize_rows)
};

const Form Q41{"Q41MatMul", 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 1, q41_columns_avx512, q41_columns_avx2};
const Form Q80{"Q80MatMul", 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 2, q80_columns_avx512, q80_columns_avx2};
const Form Q41I8{"Q41MatMulInt8", 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 1, q41i8_columns_avx512, q41i8_columns_avx2, true};

struct RiverOp {
  OrtCustomOp op;  // first: ONNX Runtime hands back a pointer to it
  const Form* form;
};

const Form& form_of(const OrtCustomOp* op) { return *reinterpret_cast<const RiverOp*>(op)->form; }

struct Kernel {
  const Form* form;
  int64_t K, N;
  Columns columns;
  Quantize quantize;
};

struct Work {
  Product product;
  Columns columns;
  int64_t groups, parts;
};

void run_part(void* data, size_t part) {
  const Work& w = *static_cast<const Work*>(data);
  int64_t g0 = w.groups * (int64_t)part / w.parts, g1 = w.groups * ((int64_t)part + 1) / w.parts;
  if (g0 < g1) w.columns(w.product, g0, g1);
}

// x [rows][K] as int8 per block of 32 (the kernels' quantize_rows), kept per thread between calls
struct Int8Rows {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  void quantize(Quantize run, const float* x, int64_t rows, int64_t K) {
    const int64_t blocks = rows * K / 32;
    q.resize(rows * K);
    scale.resize(blocks);
    sum.resize(blocks);
    run(x, blocks, q.data(), scale.data(), sum.data());
  }
};

OrtStatus* fail(const Form& form, const std::string& why) {
  return api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(form.name) + ": " + why).c_str());
}

#define TRY(expr)                          \
  do {                                     \
    if (OrtStatus* _s = (expr)) return _s; \
  } while (0)

OrtStatus* shape_of(const OrtValue* value, std::vector<int64_t>& dims, int64_t& count) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  TRY(api->GetTensorTypeAndShape(value, &info));
  size_t n = 0;
  OrtStatus* s = api->GetDimensionsCount(info, &n);
  if (!s) {
    dims.resize(n);
    s = api->GetDimensions(info, dims.data(), n);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  count = 1;
  for (int64_t d : dims) count *= d;
  return s;
}

OrtStatus* compute(void* state, OrtKernelContext* context) {
  const Kernel& k = *static_cast<const Kernel*>(state);
  const Form& form = *k.form;
  const OrtValue* in[4] = {nullptr, nullptr, nullptr, nullptr};
  std::vector<int64_t> dims[4];
  int64_t counts[4] = {0, 0, 0, 0};
  for (size_t i = 0; i < form.inputs; i++) {
    TRY(api->KernelContext_GetInput(context, i, &in[i]));
    TRY(shape_of(in[i], dims[i], counts[i]));
  }
  if (dims[0].empty() || dims[0].back() != k.K) return fail(form, "x's last dimension is not K = " + std::to_string(k.K));
  if (counts[1] * 2 != k.N * k.K * form.q_per_weight_halves) return fail(form, "q does not hold K x N levels");
  if (counts[2] != k.N * k.K / 32 || (form.inputs == 4 && counts[3] != counts[2]))
    return fail(form, "the scales (and offsets) do not hold one value a block and column");
  std::vector<int64_t> out_dims = dims[0];
  out_dims.back() = k.N;
  OrtValue* out = nullptr;
  TRY(api->KernelContext_GetOutput(context, 0, out_dims.data(), out_dims.size(), &out));
  Work w{};
  TRY(api->GetTensorData(in[0], (const void**)&w.product.x));
  TRY(api->GetTensorData(in[1], (const void**)&w.product.q));
  TRY(api->GetTensorData(in[2], (const void**)&w.product.d));
  if (form.inputs == 4) TRY(api->GetTensorData(in[3], (const void**)&w.product.m));
  TRY(api->GetTensorMutableData(out, (void**)&w.product.y));
  w.product.rows = counts[0] / k.K;
  w.product.K = k.K;
  w.product.N = k.N;
  thread_local Int8Rows int8_rows;
  if (form.int8_activations) {  // once, before the parts: every part reads all of it
    int8_rows.quantize(k.quantize, w.product.x, w.product.rows, k.K);
    w.product.xq = int8_rows.q.data();
    w.product.xs = int8_rows.scale.data();
    w.product.xsum = int8_rows.sum.data();
  }
  w.columns = k.columns;
  w.groups = k.N / 32;
  if (w.product.rows == 0) return nullptr;
  // one contiguous range of columns a part, two groups at least (the kernel's widest pass); the pool
  // runs the parts on its threads (its size is not known here: the machine's cores bound it)
  w.parts = std::max<int64_t>(1, std::min<int64_t>(w.groups / 2, std::thread::hardware_concurrency()));
  if (w.parts == 1) {  // no round trip through the pool for one part (~1 us a call)
    run_part(&w, 0);
    return nullptr;
  }
  return api->KernelContext_ParallelFor(context, run_part, (size_t)w.parts, 0, &w);
}

OrtStatus* create(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** state) {
  const Form& form = form_of(op);
  Kernel k{&form, 0, 0, nullptr, nullptr};
  TRY(api->KernelInfoGetAttribute_int64(info, "K", &k.K));
  TRY(api->KernelInfoGetAttribute_int64(info, "N", &k.N));
  Isa isa = best_isa();
  if (isa == Isa::none) return fail(form, "this CPU has neither AVX-512 nor AVX2 with FMA and F16C");
  if (k.K <= 0 || k.K % 32 || k.N <= 0 || k.N % 32) return fail(form, "K and N must be positive multiples of 32");
  k.columns = isa == Isa::avx512 ? form.avx512 : form.avx2;
  k.quantize = isa == Isa::avx512 ? quantize_rows_avx512 : quantize_rows_avx2;
  *state = new Kernel(k);
  return nullptr;
}

ONNXTensorElementDataType input_type(const OrtCustomOp* op, size_t index) {
  switch (index) {
    case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case 1: return form_of(op).q_type;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
}

RiverOp make_op(const Form* form) {
  RiverOp river{};
  OrtCustomOp& op = river.op;  // every later field null: ONNX Runtime reads only those of this version
  op.version = 16;             // CreateKernelV2 / KernelComputeV2
  op.GetName = [](const OrtCustomOp* o) { return form_of(o).name; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  op.GetInputType = input_type;
  op.GetInputTypeCount = [](const OrtCustomOp* o) -> size_t { return form_of(o).inputs; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.KernelDestroy = [](void* state) { delete static_cast<Kernel*>(state); };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  river.form = form;
  return river;
}

const RiverOp ops[] = {make_op(&Q41), make_op(&Q80), make_op(&Q41I8)};

}  // namespace

extern "C" {

// "avx512", "avx2" or "none": the kernels this CPU gets (the compiler lowers to the ops only if not "none")
__attribute__((visibility("default"))) const char* RiverOpsIsa() {
  switch (best_isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "none";
  }
}

__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  api = base->GetApi(API_NEEDED);
  if (api == nullptr) {
    std::fprintf(stderr, "river ops: this ONNX Runtime is older than 1.17 (its C API %u is missing)\n", API_NEEDED);
    return nullptr;  // without the API there is no way to return a status: the session will not know the ops
  }
  OrtCustomOpDomain* domain = nullptr;
  TRY(api->CreateCustomOpDomain("ai.river", &domain));
  for (const RiverOp& op : ops) TRY(api->CustomOpDomain_Add(domain, &op.op));
  return api->AddCustomOpDomain(options, domain);
}

}  // extern "C"

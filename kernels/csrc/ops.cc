// onnxruntime registration of the ai.edgecompress ops (version 1): one CPU kernel (float32, float16) and
// one CUDA kernel (float32, float16, bfloat16) per op name, both built on the lite API's op base so their
// schemas agree (custom_ops.cc IsCompatible). Each op declares its inputs optional and of any type: the
// kernel itself checks the input count and dtypes, so a bad input becomes an error that starts with the
// op's name instead of onnxruntime's generic "could not find an implementation", and an fp16 model runs
// the fp16 kernel (no Cast-wrapped fp32 fallback). No exception crosses the C ABI.
#define ORT_API_MANUAL_INIT  // the API comes from RegisterCustomOps' api_base: no link to libonnxruntime
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "cuda_launch.h"
#include "library_info.h"
#include "op_shapes.h"

namespace ec {
namespace {

constexpr int32_t kFloat = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr int32_t kFloat16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr int32_t kBFloat16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;

struct Kernel {
  OpKind kind;
  bool cuda;
  int device_id;  // the CUDA device of the kernel's allocator (0 on the CPU)
};

OrtStatus* MakeStatus(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, message.c_str());
}

std::vector<InputInfo> ReadInputs(Ort::KernelContext& ctx, std::vector<const void*>& data) {
  std::vector<InputInfo> inputs(ctx.GetInputCount());
  data.assign(inputs.size(), nullptr);
  for (size_t i = 0; i < inputs.size(); ++i) {
    Ort::ConstValue value = ctx.GetInput(i);
    if (!static_cast<const OrtValue*>(value)) continue;  // an empty optional input
    auto info = value.GetTensorTypeAndShapeInfo();
    inputs[i].present = true;
    inputs[i].dtype = info.GetElementType();
    inputs[i].shape = info.GetShape();
    data[i] = value.GetTensorRawData();
  }
  return inputs;
}

template <class T>
void RunCpu(OpKind kind, const std::vector<const void*>& in, const OpDims& d, void* y) {
  auto p = [&](size_t i) { return static_cast<const T*>(in[i]); };
  T* out = static_cast<T*>(y);
  if (kind == OpKind::kLowRank)
    CpuLowRank<T>(p(0), p(1), p(2), d.has_bias ? p(3) : nullptr, out, d.m, d.k, d.rank, d.n);
  else if (kind == OpKind::kMonarch)
    CpuMonarch<T>(p(0), p(1), p(2), d.has_bias ? p(3) : nullptr, out, d.m, d.blocks, d.p, d.rank, d.q);
  else
    CpuBlast<T>(p(0), p(1), p(2), p(3), d.has_bias ? p(4) : nullptr, out, d.m, d.blocks, d.p, d.rank, d.q);
}

// Device memory for the launch layer's intermediates, from onnxruntime's CUDA allocator.
struct OrtWorkspace {
  OrtAllocator* allocator = nullptr;
  ~OrtWorkspace() {
    if (allocator) Ort::GetApi().ReleaseAllocator(allocator);
  }
  static void* Alloc(void* self, size_t bytes) {
    auto* a = static_cast<OrtAllocator*>(self);
    return a->Alloc(a, bytes);
  }
  static void Release(void* self, void* ptr) {
    auto* a = static_cast<OrtAllocator*>(self);
    a->Free(a, ptr);
  }
  Workspace View() const { return Workspace{&Alloc, &Release, allocator}; }
};

std::string RunCuda(const Kernel& kernel, OrtKernelContext* context, int32_t dtype,
                    const std::vector<const void*>& in, const OpDims& d, void* y) {
  const OrtApi& api = Ort::GetApi();
  void* stream = nullptr;
  if (OrtStatus* status = api.KernelContext_GetGPUComputeStream(context, &stream)) {
    std::string message = api.GetErrorMessage(status);
    api.ReleaseStatus(status);
    return "no CUDA stream: " + message;
  }
  Ort::MemoryInfo memory("Cuda", OrtArenaAllocator, kernel.device_id, OrtMemTypeDefault);
  OrtWorkspace workspace;
  if (OrtStatus* status = api.KernelContext_GetAllocator(context, memory, &workspace.allocator)) {
    std::string message = api.GetErrorMessage(status);
    api.ReleaseStatus(status);
    return "no CUDA allocator: " + message;
  }
  const DType t = static_cast<DType>(dtype);
  const Workspace ws = workspace.View();
  if (kernel.kind == OpKind::kLowRank)
    return CudaLowRank(t, stream, in[0], in[1], in[2], d.has_bias ? in[3] : nullptr, y, d.m, d.k, d.rank, d.n, ws);
  if (kernel.kind == OpKind::kMonarch)
    return CudaMonarch(t, stream, in[0], in[1], in[2], d.has_bias ? in[3] : nullptr, y, d.m, d.blocks, d.p, d.rank,
                       d.q, ws);
  return CudaBlast(t, stream, in[0], in[1], in[2], in[3], d.has_bias ? in[4] : nullptr, y, d.m, d.blocks, d.p,
                   d.rank, d.q, ws);
}

OrtStatus* Compute(void* op_kernel, OrtKernelContext* context) noexcept {
  const Kernel& kernel = *static_cast<Kernel*>(op_kernel);
  const std::string name = std::string(OpName(kernel.kind)) + (kernel.cuda ? "(CUDA)" : "");
  try {
    Ort::KernelContext ctx(context);
    std::vector<const void*> data;
    const std::vector<InputInfo> inputs = ReadInputs(ctx, data);
    OpDims dims;
    const std::vector<int32_t> dtypes = kernel.cuda ? std::vector<int32_t>{kFloat, kFloat16, kBFloat16}
                                                    : std::vector<int32_t>{kFloat, kFloat16};
    if (std::string error = CheckInputs(kernel.kind, inputs, dtypes, dims); !error.empty())
      return MakeStatus(ORT_INVALID_ARGUMENT, name + ": " + error);
    void* y = ctx.GetOutput(0, dims.y_shape).GetTensorMutableRawData();
    if (kernel.cuda) {
      if (std::string error = RunCuda(kernel, context, inputs[0].dtype, data, dims, y); !error.empty())
        return MakeStatus(ORT_EP_FAIL, name + ": " + error);
    } else if (inputs[0].dtype == kFloat) {
      RunCpu<float>(kernel.kind, data, dims, y);
    } else {
      RunCpu<Half>(kernel.kind, data, dims, y);
    }
    return nullptr;
  } catch (const Ort::Exception& e) {
    return MakeStatus(e.GetOrtErrorCode(), name + ": " + e.what());
  } catch (const std::exception& e) {
    return MakeStatus(ORT_FAIL, name + ": " + e.what());
  } catch (...) {
    return MakeStatus(ORT_FAIL, name + ": unknown error");
  }
}

// Output type = X's type, shape = X's leading dims + N (when the weights' shapes are known). Best effort:
// a problem here is left to the kernel, which reports it with the op's name at run time.
OrtStatus* InferOutput(OpKind kind, OrtShapeInferContext* ctx) noexcept {
  const OrtApi& api = Ort::GetApi();
  auto dims_of = [&](size_t i, int32_t* dtype, std::vector<int64_t>* dims, std::vector<const char*>* symbols) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (OrtStatus* s = api.ShapeInferContext_GetInputTypeShape(ctx, i, &info)) return api.ReleaseStatus(s), false;
    ONNXTensorElementDataType type{};
    size_t count = 0;
    bool ok = !api.GetTensorElementType(info, &type) && !api.GetDimensionsCount(info, &count);
    if (ok) {
      dims->resize(count);
      symbols->assign(count, nullptr);
      ok = (count == 0 || !api.GetDimensions(info, dims->data(), count)) &&
           (count == 0 || !api.GetSymbolicDimensions(info, symbols->data(), count));
    }
    *dtype = type;  // info belongs to the context (onnxruntime frees it): not released here
    return ok;
  };
  size_t count = 0;
  if (OrtStatus* s = api.ShapeInferContext_GetInputCount(ctx, &count)) return api.ReleaseStatus(s), nullptr;
  const size_t weights = kind == OpKind::kBlast ? 3 : 2;
  if (count < 1 + weights) return nullptr;
  int32_t dtype = 0, wtype = 0;
  std::vector<int64_t> x, w;
  std::vector<const char*> xsym, wsym;
  if (!dims_of(0, &dtype, &x, &xsym) || x.empty()) return nullptr;
  int64_t n = -1;  // unknown
  if (kind == OpKind::kLowRank && dims_of(2, &wtype, &w, &wsym) && w.size() == 2) n = w[1];
  if (kind == OpKind::kMonarch && dims_of(2, &wtype, &w, &wsym) && w.size() == 3 && w[0] >= 0 && w[2] >= 0)
    n = w[0] * w[2];
  if (kind == OpKind::kBlast && dims_of(1, &wtype, &w, &wsym) && w.size() == 3 && w[0] >= 0 && w[2] >= 0)
    n = w[0] * w[2];
  x.back() = n;
  xsym.back() = "";
  OrtTensorTypeAndShapeInfo* out = nullptr;
  if (OrtStatus* s = api.CreateTensorTypeAndShapeInfo(&out)) return api.ReleaseStatus(s), nullptr;
  OrtStatus* s = api.SetTensorElementType(out, static_cast<ONNXTensorElementDataType>(dtype));
  if (!s) s = api.SetDimensions(out, x.data(), x.size());
  if (!s) s = api.SetSymbolicDimensions(out, xsym.data(), xsym.size());
  if (!s) s = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
  if (s) api.ReleaseStatus(s);
  api.ReleaseTensorTypeAndShapeInfo(out);
  return nullptr;
}

// The CUDA device a CUDA kernel runs on: from its execution provider's allocator (0 if unknown).
int DeviceOf(const OrtApi* api, const OrtKernelInfo* info) {
  OrtAllocator* allocator = nullptr;
  int id = 0;
  if (OrtStatus* s = api->KernelInfoGetAllocator(info, OrtMemTypeDefault, &allocator)) return api->ReleaseStatus(s), 0;
  const OrtMemoryInfo* memory = allocator->Info(allocator);
  if (OrtStatus* s = api->MemoryInfoGetId(memory, &id)) api->ReleaseStatus(s), id = 0;
  api->ReleaseAllocator(allocator);
  return id;
}

// One op of the domain on one execution provider. The lite base supplies name, provider, versions and the
// input/output characteristics (an undefined type = variadic); compute and shape inference are ours.
template <OpKind kKind, bool kCuda>
struct Op : Ort::Custom::OrtLiteCustomOp {
  static constexpr size_t kNamedInputs = kKind == OpKind::kBlast ? 5 : 4;  // X, weights, bias
  Op() : OrtLiteCustomOp(OpName(kKind), kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider", {}) {
    input_types_.assign(kNamedInputs, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED);
    output_types_ = {ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED};
    // Every input optional and of any type: bias may be "" or absent, and a missing weight or a wrong
    // dtype reaches our check. (Too many inputs are refused by onnxruntime's schema check at load.)
    OrtCustomOp::GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_OPTIONAL; };
    OrtCustomOp::GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    OrtCustomOp::CreateKernel = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info) -> void* {
      return new (std::nothrow) Kernel{kKind, kCuda, kCuda ? DeviceOf(api, info) : 0};
    };
    OrtCustomOp::KernelComputeV2 = &Compute;
    OrtCustomOp::KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      return InferOutput(kKind, ctx);
    };
  }
};

struct Registry {
  Ort::CustomOpDomain domain{kDomain};
  std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
};

Registry& TheRegistry() {  // built once, kept for the process: onnxruntime holds pointers to it
  static Registry* registry = [] {
    auto* r = new Registry;
    r->ops.emplace_back(new Op<OpKind::kLowRank, false>);
    r->ops.emplace_back(new Op<OpKind::kLowRank, true>);
    r->ops.emplace_back(new Op<OpKind::kMonarch, false>);
    r->ops.emplace_back(new Op<OpKind::kMonarch, true>);
    r->ops.emplace_back(new Op<OpKind::kBlast, false>);
    r->ops.emplace_back(new Op<OpKind::kBlast, true>);
    for (auto& op : r->ops) r->domain.Add(op.get());
    return r;
  }();
  return *registry;
}

}  // namespace
}  // namespace ec

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    const std::string message = std::string("libedgecompress_ops: built with the onnxruntime C API ") +
                                std::to_string(ORT_API_VERSION) + " headers (onnxruntime >= 1." +
                                std::to_string(ORT_API_VERSION) + "), but this onnxruntime is " +
                                api_base->GetVersionString() + "; upgrade onnxruntime or rebuild (make kernels)";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  static std::once_flag init;
  std::call_once(init, [api] { Ort::InitApi(api); });
  try {
    Ort::UnownedSessionOptions(options).Add(ec::TheRegistry().domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

extern "C" __attribute__((visibility("default"))) const char* ec_library_info() { return ec::LibraryInfoJson(); }

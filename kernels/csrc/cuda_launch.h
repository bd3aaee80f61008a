// The CUDA side of the library: launches the Triton cubins (embedded by the generator) with the CUDA
// driver API, resolved at run time by dlopen("libcuda.so.1") -- the library links neither libcuda nor
// libonnxruntime. Used by the onnxruntime CUDA kernels (ops.cc) and by the plain C entry points
// (c_api.cc) that launch the same cubins on caller-given device pointers (bench/gpu/check.sh).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace ec {

enum class DType : int { kFloat32 = 1, kFloat16 = 10, kBFloat16 = 16 };  // ONNX TensorProto codes

// Device memory for intermediates: onnxruntime's allocator in the op, the caller's buffer in the C API.
struct Workspace {
  void* (*alloc)(void* self, size_t bytes);  // nullptr result = out of memory
  void (*release)(void* self, void* ptr);
  void* self;
};

// Each returns "" on success, else a one-line message (the caller prefixes the op's name).
// Pointers are device pointers; bias may be nullptr; m may be 0 (nothing is launched).
std::string CudaLowRank(DType dtype, void* stream, const void* x, const void* a, const void* b, const void* bias,
                        void* y, int64_t m, int64_t k, int64_t r, int64_t n, const Workspace& workspace);
std::string CudaMonarch(DType dtype, void* stream, const void* x, const void* w1, const void* w2, const void* bias,
                        void* y, int64_t m, int64_t blocks, int64_t p, int64_t channels, int64_t q,
                        const Workspace& workspace);
std::string CudaBlast(DType dtype, void* stream, const void* x, const void* u, const void* s, const void* v,
                      const void* bias, void* y, int64_t m, int64_t blocks, int64_t p, int64_t r, int64_t q,
                      const Workspace& workspace);
// "" when libcuda loads and cuInit succeeds, else why not (no driver, no device, ...).
std::string CudaProbe();

}  // namespace ec

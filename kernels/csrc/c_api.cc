// Plain C entry points of the CUDA launch path, for callers outside onnxruntime (bench/gpu/check.sh
// through ctypes, tests with the mock libcuda). Pointers are device pointers on `stream` (a CUstream /
// cudaStream_t, or null for the current context); `workspace` is a caller-owned device buffer of at least
// the size ec_cuda_*_workspace_bytes returns. Each returns 0 on success, else 1 with a one-line message
// in err (truncated to err_len, always NUL-terminated).
#include <cstdio>
#include <cstring>
#include <string>

#include "cuda_launch.h"

#define EC_EXPORT extern "C" __attribute__((visibility("default")))

namespace ec {
// Defined in cuda_launch.cc.
size_t LowRankWorkspaceBytes(DType dtype, int64_t m, int64_t k, int64_t r, int64_t n);
size_t BlockWorkspaceBytes(DType dtype, int64_t m, int64_t blocks, int64_t channels);
}  // namespace ec

namespace {

struct CallerBuffer {
  void* ptr;
  size_t bytes;
  size_t asked = 0;
};

void* HandOut(void* self, size_t bytes) {
  auto* buffer = static_cast<CallerBuffer*>(self);
  buffer->asked = bytes;
  return bytes <= buffer->bytes ? buffer->ptr : nullptr;
}

void Keep(void*, void*) {}  // the caller owns the buffer

int Report(const std::string& op, const std::string& error, const CallerBuffer& buffer, char* err, size_t err_len) {
  if (error.empty()) {
    if (err && err_len) err[0] = '\0';
    return 0;
  }
  std::string text = op + "(CUDA): " + error;
  if (buffer.asked > buffer.bytes)
    text += " (needs " + std::to_string(buffer.asked) + " bytes, the caller gave " + std::to_string(buffer.bytes) + ")";
  if (err && err_len) std::snprintf(err, err_len, "%s", text.c_str());
  return 1;
}

}  // namespace

EC_EXPORT int ec_cuda_lowrank(int dtype, void* stream, const void* x, const void* a, const void* b, const void* bias,
                              void* y, int64_t m, int64_t k, int64_t r, int64_t n, void* workspace,
                              size_t workspace_bytes, char* err, size_t err_len) {
  CallerBuffer buffer{workspace, workspace ? workspace_bytes : 0};
  ec::Workspace ws{HandOut, Keep, &buffer};
  return Report("LowRankMatMul",
                ec::CudaLowRank(static_cast<ec::DType>(dtype), stream, x, a, b, bias, y, m, k, r, n, ws), buffer, err,
                err_len);
}

EC_EXPORT int ec_cuda_monarch(int dtype, void* stream, const void* x, const void* w1, const void* w2, const void* bias,
                              void* y, int64_t m, int64_t blocks, int64_t p, int64_t channels, int64_t q,
                              void* workspace, size_t workspace_bytes, char* err, size_t err_len) {
  CallerBuffer buffer{workspace, workspace ? workspace_bytes : 0};
  ec::Workspace ws{HandOut, Keep, &buffer};
  return Report("MonarchMatMul",
                ec::CudaMonarch(static_cast<ec::DType>(dtype), stream, x, w1, w2, bias, y, m, blocks, p, channels, q, ws),
                buffer, err, err_len);
}

EC_EXPORT int ec_cuda_blast(int dtype, void* stream, const void* x, const void* u, const void* s, const void* v,
                            const void* bias, void* y, int64_t m, int64_t blocks, int64_t p, int64_t r, int64_t q,
                            void* workspace, size_t workspace_bytes, char* err, size_t err_len) {
  CallerBuffer buffer{workspace, workspace ? workspace_bytes : 0};
  ec::Workspace ws{HandOut, Keep, &buffer};
  return Report("BlastMatMul",
                ec::CudaBlast(static_cast<ec::DType>(dtype), stream, x, u, s, v, bias, y, m, blocks, p, r, q, ws),
                buffer, err, err_len);
}

// Bytes of device workspace each op needs for these sizes (0: none); same arguments as the launch.
EC_EXPORT size_t ec_cuda_lowrank_workspace_bytes(int dtype, int64_t m, int64_t k, int64_t r, int64_t n) {
  return ec::LowRankWorkspaceBytes(static_cast<ec::DType>(dtype), m, k, r, n);
}

EC_EXPORT size_t ec_cuda_monarch_workspace_bytes(int dtype, int64_t m, int64_t blocks, int64_t p, int64_t channels,
                                                 int64_t q) {
  (void)p, (void)q;
  return ec::BlockWorkspaceBytes(static_cast<ec::DType>(dtype), m, blocks, channels);
}

EC_EXPORT size_t ec_cuda_blast_workspace_bytes(int dtype, int64_t m, int64_t blocks, int64_t p, int64_t r, int64_t q) {
  (void)p, (void)q;
  return ec::BlockWorkspaceBytes(static_cast<ec::DType>(dtype), m, blocks, r);
}

// 0 when libcuda loads and cuInit succeeds, else 1 and why not.
EC_EXPORT int ec_cuda_probe(char* err, size_t err_len) {
  CallerBuffer none{nullptr, 0};
  std::string error = ec::CudaProbe();
  if (error.empty()) return Report("", "", none, err, err_len);
  if (err && err_len) std::snprintf(err, err_len, "%s", error.c_str());
  return 1;
}

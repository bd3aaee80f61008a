// Input checks of the ai.edgecompress ops, shared by the CPU and CUDA kernels (and the same rules as
// kernels/reference.py): counts, ranks, shapes and dtypes, each failure a one-line message.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ec {

enum class OpKind { kLowRank, kMonarch, kBlast };

const char* OpName(OpKind kind);

struct InputInfo {
  bool present = false;  // false: an empty optional input (bias "")
  int32_t dtype = 0;     // ONNX TensorProto element type
  std::vector<int64_t> shape;
};

// Sizes every kernel needs. LowRank: k, rank = R, n. Monarch: blocks, p, rank = R channels, q.
// BLAST: blocks, p, rank = r, q. m = rows of X (product of its leading dims).
struct OpDims {
  int64_t m = 0, k = 0, n = 0, blocks = 1, p = 0, q = 0, rank = 0;
  bool has_bias = false;
  std::vector<int64_t> y_shape;
};

// "" when the inputs fit the op (dims filled in), else the problem without the op's name.
// `dtypes` lists the element types this execution provider runs.
std::string CheckInputs(OpKind kind, const std::vector<InputInfo>& inputs, const std::vector<int32_t>& dtypes,
                        OpDims& dims);

const char* DTypeName(int32_t dtype);

}  // namespace ec

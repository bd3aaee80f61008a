#include "op_shapes.h"

#include <algorithm>

namespace ec {
namespace {

constexpr int32_t kFloat = 1, kFloat16 = 10, kBFloat16 = 16, kDouble = 11;

// Python's tuple spelling, as the reference's messages use: (576, 128), (5,), ().
std::string Shape(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

struct Spec {
  std::vector<const char*> names;  // inputs in order; the last one (bias) is optional
  std::vector<size_t> ranks;       // of the weights (inputs 1 ..)
};

const Spec& SpecOf(OpKind kind) {
  static const Spec low_rank{{"X", "A", "B", "bias"}, {2, 2}};
  static const Spec monarch{{"X", "W1", "W2", "bias"}, {3, 3}};
  static const Spec blast{{"X", "U", "S", "V", "bias"}, {3, 3, 3}};
  return kind == OpKind::kLowRank ? low_rank : kind == OpKind::kMonarch ? monarch : blast;
}

std::string Signature(const Spec& spec) {
  std::string out;
  for (size_t i = 0; i + 1 < spec.names.size(); ++i) out += (i ? ", " : "") + std::string(spec.names[i]);
  return out + "[, bias]";
}

std::string CheckShapes(OpKind kind, const std::vector<InputInfo>& in, OpDims& d) {
  const auto& s1 = in[1].shape;
  const auto& s2 = in[2].shape;
  if (kind == OpKind::kLowRank) {
    if (s1[1] != s2[0]) return "A " + Shape(s1) + " and B " + Shape(s2) + " must be [K, R] and [R, N]";
    d.k = s1[0], d.rank = s1[1], d.n = s2[1];
  } else if (kind == OpKind::kMonarch) {
    const int64_t b = s1[0], p = s1[1], r = s1[2];
    if (s2[0] != b || s2[1] != r)
      return "W2 " + Shape(s2) + " must be [" + std::to_string(b) + ", " + std::to_string(r) + ", q] to follow W1 " +
             Shape(s1);
    if (b == 0 || r % b)
      return "R=" + std::to_string(r) + " channels per block must be a multiple of the " + std::to_string(b) +
             " blocks";
    d.blocks = b, d.p = p, d.rank = r, d.q = s2[2], d.k = b * p, d.n = b * d.q;
  } else {
    const auto& v = in[3].shape;  // U = s1, S = s2
    const int64_t b = v[0], p = v[1], r = v[2];
    if (s2 != std::vector<int64_t>{b, b, r} || s1[0] != b || s1[1] != r)
      return "with V " + Shape(v) + ", S must be [" + std::to_string(b) + ", " + std::to_string(b) + ", " +
             std::to_string(r) + "] and U [" + std::to_string(b) + ", " + std::to_string(r) + ", q]; got S " +
             Shape(s2) + ", U " + Shape(s1);
    d.blocks = b, d.p = p, d.rank = r, d.q = s1[2], d.k = b * p, d.n = b * d.q;
  }
  return "";
}

}  // namespace

const char* OpName(OpKind kind) {
  return kind == OpKind::kLowRank ? "LowRankMatMul" : kind == OpKind::kMonarch ? "MonarchMatMul" : "BlastMatMul";
}

const char* DTypeName(int32_t dtype) {
  switch (dtype) {
    case kFloat: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kDouble: return "float64";
    default: return "a non-float type";
  }
}

std::string CheckInputs(OpKind kind, const std::vector<InputInfo>& in, const std::vector<int32_t>& dtypes,
                        OpDims& d) {
  const Spec& spec = SpecOf(kind);
  const size_t required = spec.names.size() - 1;
  if (in.size() < required || in.size() > spec.names.size())
    return "expected " + std::to_string(required) + " or " + std::to_string(spec.names.size()) + " inputs (" +
           Signature(spec) + "), got " + std::to_string(in.size());
  for (size_t i = 0; i < required; ++i)
    if (!in[i].present) return std::string("input ") + spec.names[i] + " is missing (only bias is optional)";
  const int32_t dtype = in[0].dtype;
  if (std::find(dtypes.begin(), dtypes.end(), dtype) == dtypes.end()) {
    std::string supported;
    for (size_t i = 0; i < dtypes.size(); ++i) supported += (i ? ", " : "") + std::string(DTypeName(dtypes[i]));
    return std::string("X is ") + DTypeName(dtype) + "; this execution provider runs " + supported;
  }
  for (size_t i = 1; i < in.size(); ++i)
    if (in[i].present && in[i].dtype != dtype)
      return std::string("mixed dtypes: X is ") + DTypeName(dtype) + " but " + spec.names[i] + " is " +
             DTypeName(in[i].dtype) + " (all inputs share one type)";
  for (size_t i = 1; i < required; ++i)
    if (in[i].shape.size() != spec.ranks[i - 1])
      return std::string(spec.names[i]) + " " + Shape(in[i].shape) + " must have rank " +
             std::to_string(spec.ranks[i - 1]);
  if (std::string error = CheckShapes(kind, in, d); !error.empty()) return error;
  const auto& x = in[0].shape;
  if (x.empty() || x.back() != d.k)
    return "X's last dimension " + (x.empty() ? std::string("()") : Shape({x.back()})) +
           " does not match the weight's " + std::to_string(d.k) + " inputs";
  d.has_bias = in.size() == spec.names.size() && in.back().present;
  if (d.has_bias && in.back().shape != std::vector<int64_t>{d.n})
    return "bias has shape " + Shape(in.back().shape) + ", expected (" + std::to_string(d.n) + ",)";
  d.m = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) d.m *= x[i];
  d.y_shape.assign(x.begin(), x.end() - 1);
  d.y_shape.push_back(d.n);
  return "";
}

}  // namespace ec

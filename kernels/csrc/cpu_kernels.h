// CPU kernels of the ai.edgecompress ops (kernels/reference.py defines what they compute). Plain C++:
// no onnxruntime types, so the math can be read (and tested) apart from the registration in ops.cc.
// Storage is float or fp16 (Half); products accumulate in float; the intermediate is rounded to the
// storage type before the second product, as the reference does.
#pragma once
#include <cstdint>

namespace ec {

struct Half {  // IEEE binary16 bits (same layout as Ort::Float16_t)
  uint16_t bits;
};

// m rows of X [m, k]; bias may be nullptr; m may be 0.
template <class T>
void CpuLowRank(const T* x, const T* a, const T* b, const T* bias, T* y, int64_t m, int64_t k, int64_t r,
                int64_t n);
template <class T>
void CpuMonarch(const T* x, const T* w1, const T* w2, const T* bias, T* y, int64_t m, int64_t blocks, int64_t p,
                int64_t channels, int64_t q);
template <class T>
void CpuBlast(const T* x, const T* u, const T* s, const T* v, const T* bias, T* y, int64_t m, int64_t blocks,
              int64_t p, int64_t r, int64_t q);

}  // namespace ec

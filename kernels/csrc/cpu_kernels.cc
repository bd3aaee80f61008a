// CPU kernels: every op is a few float GEMMs on row chunks of X, with the intermediate kept in a
// chunk-sized buffer (cache-resident) and rounded to the storage type between the two products.
#include "cpu_kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// On x86-64 the hot loops are also compiled for x86-64-v3 (AVX2+FMA+F16C), picked at load time from the
// CPU's features, so one portable .so runs near the machine's speed (the SSE2 default clone measured ~40x
// slower here; an "arch=haswell" clone would only be picked on that CPU model). Elsewhere: -O3's default.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EC_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EC_HOT
#endif

namespace ec {
namespace {

constexpr int64_t kMr = 6;          // rows per register tile (12 of the 16 AVX registers)
constexpr int64_t kNr = 16;         // columns per register tile (2 AVX vectors, 4 NEON vectors)
constexpr int64_t kWideNr = 64;     // columns per tile for 1-2 rows (decode)
constexpr int64_t kKc = 256;        // depth per pass: a 256x16 panel of B stays in L1
constexpr int64_t kRowChunk = 128;  // rows of X per chunk: the chunk's intermediate stays in L2

#if defined(__FLT16_MAX__)
inline __attribute__((always_inline)) float HalfToFloat(Half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}
// Round to nearest even, as the compiler's conversion does.
inline __attribute__((always_inline)) Half FloatToHalf(float f) {
  _Float16 v = static_cast<_Float16>(f);
  Half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
#else
#error "this compiler has no _Float16 (on x86-64 it needs g++ >= 12)"
#endif

// fp16 <-> float, 8 at a time with F16C where the CPU has it (GCC 12 scalarises vector conversions of
// _Float16, so the intrinsics are used explicitly), one by one elsewhere and for the tail.
#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) int64_t HalvesToFloatsF16c(const Half* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  return i;
}
__attribute__((target("avx,f16c"))) int64_t FloatsToHalvesF16c(const float* src, int64_t count, Half* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return i;
}
bool HasF16c() {  // __builtin_cpu_init first: the answer may be asked before libgcc's constructor ran
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c"));
  return has;
}
#endif

void HalvesToFloats(const Half* src, int64_t count, float* dst) {
  int64_t i = 0;
#if defined(__x86_64__)
  if (HasF16c()) i = HalvesToFloatsF16c(src, count, dst);
#endif
  for (; i < count; ++i) dst[i] = HalfToFloat(src[i]);
}
void FloatsToHalves(const float* src, int64_t count, Half* dst) {
  int64_t i = 0;
#if defined(__x86_64__)
  if (HasF16c()) i = FloatsToHalvesF16c(src, count, dst);
#endif
  for (; i < count; ++i) dst[i] = FloatToHalf(src[i]);
}
// Rounds float values to fp16 and back: the intermediate as an fp16 graph would store it.
void RoundThroughHalf(float* values, int64_t count) {
  Half buffer[256];
  for (int64_t i = 0; i < count; i += 256) {
    const int64_t chunk = std::min<int64_t>(256, count - i);
    FloatsToHalves(values + i, chunk, buffer);
    HalvesToFloats(buffer, chunk, values + i);
  }
}

// One register tile: C[MR, 16] (+)= A[MR, kc] · B[kc, 16]. The accumulators are GCC vector values
// (two 8-float halves per row), so they live in registers whatever the target: one AVX register each
// in the haswell clone, two SSE/NEON registers otherwise. always_inline: compiled inside each clone.
typedef float Vec8 __attribute__((vector_size(32)));
// Vec8 values never cross a call (every helper is always_inline), so the ABI note GCC gives for 32-byte
// vectors in the default (SSE) clone does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

inline __attribute__((always_inline)) Vec8 Load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline __attribute__((always_inline)) void Store8(float* p, Vec8 v) { std::memcpy(p, &v, sizeof v); }

template <int64_t MR, int64_t NV>  // MR rows x NV vectors of 8 columns
inline __attribute__((always_inline)) void Tile(int64_t kc, const float* a, int64_t lda, const float* b,
                                                int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  Vec8 acc[MR][NV];
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t v = 0; v < NV; ++v) acc[i][v] = accumulate ? Load8(c + i * ldc + 8 * v) : Vec8{};
  for (int64_t kk = 0; kk < kc; ++kk) {
    Vec8 bv[NV];
    for (int64_t v = 0; v < NV; ++v) bv[v] = Load8(b + kk * ldb + 8 * v);
    for (int64_t i = 0; i < MR; ++i) {
      const float av = a[i * lda + kk];
      for (int64_t v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t v = 0; v < NV; ++v) Store8(c + i * ldc + 8 * v, acc[i][v]);
}

// The ragged right edge (nr < 16 columns): plain loops, taken only when N is not a multiple of 16.
inline __attribute__((always_inline)) void EdgeTile(int64_t mr, int64_t nr, int64_t kc, const float* a, int64_t lda,
                                                    const float* b, int64_t ldb, float* c, int64_t ldc,
                                                    bool accumulate) {
  for (int64_t i = 0; i < mr; ++i) {
    float acc[kNr];
    for (int64_t j = 0; j < nr; ++j) acc[j] = accumulate ? c[i * ldc + j] : 0.0f;
    for (int64_t kk = 0; kk < kc; ++kk) {
      const float av = a[i * lda + kk];
      for (int64_t j = 0; j < nr; ++j) acc[j] += av * b[kk * ldb + j];
    }
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = acc[j];
  }
}

// C[m, n] = A[m, k] · B[k, n], row-major with leading dimensions (C is overwritten; k = 0 gives zeros).
EC_HOT void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc) {
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  for (int64_t k0 = 0; k0 < k; k0 += kKc) {
    const int64_t kc = std::min(kKc, k - k0);
    const bool accumulate = k0 > 0;
    int64_t j0 = 0;
    if (m <= 2) {  // decode: one row has one FMA chain per vector; 8 vectors side by side hide the latency
      for (; j0 + kWideNr <= n; j0 += kWideNr)
        for (int64_t i = 0; i < m; ++i)
          Tile<1, kWideNr / 8>(kc, a + i * lda + k0, lda, b + k0 * ldb + j0, ldb, c + i * ldc + j0, ldc, accumulate);
    }
    for (; j0 < n; j0 += kNr) {
      const int64_t nr = std::min(kNr, n - j0);
      const float* bp = b + k0 * ldb + j0;
      for (int64_t i0 = 0; i0 < m; i0 += kMr) {
        const int64_t mr = std::min(kMr, m - i0);
        const float* ap = a + i0 * lda + k0;
        float* cp = c + i0 * ldc + j0;
        if (nr < kNr) EdgeTile(mr, nr, kc, ap, lda, bp, ldb, cp, ldc, accumulate);
        else if (mr == 6) Tile<6, 2>(kc, ap, lda, bp, ldb, cp, ldc, accumulate);
        else if (mr == 5) Tile<5, 2>(kc, ap, lda, bp, ldb, cp, ldc, accumulate);
        else if (mr == 4) Tile<4, 2>(kc, ap, lda, bp, ldb, cp, ldc, accumulate);
        else if (mr == 3) Tile<3, 2>(kc, ap, lda, bp, ldb, cp, ldc, accumulate);
        else if (mr == 2) Tile<2, 2>(kc, ap, lda, bp, ldb, cp, ldc, accumulate);
        else Tile<1, 2>(kc, ap, lda, bp, ldb, cp, ldc, accumulate);
      }
    }
  }
}

// Storage <-> float. Float data is used in place (no copy); fp16 data is widened into a buffer.
struct FloatView {
  std::vector<float> buffer;
  const float* data = nullptr;
};
inline void View(const float* src, int64_t count, FloatView& view) {
  (void)count;
  view.data = src;
}
inline void View(const Half* src, int64_t count, FloatView& view) {
  view.buffer.resize(static_cast<size_t>(count));
  HalvesToFloats(src, count, view.buffer.data());
  view.data = view.buffer.data();
}
inline void RoundToStorage(float*, int64_t, const float*) {}  // float storage: nothing to round
inline void RoundToStorage(float* values, int64_t count, const Half*) { RoundThroughHalf(values, count); }

// Y rows (float accumulators) + bias, written in the storage type.
inline void Store(const float* acc, const float* bias, int64_t rows, int64_t n, float* y) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) y[i * n + j] = acc[i * n + j] + (bias ? bias[j] : 0.0f);
}
inline void Store(const float* acc, const float* bias, int64_t rows, int64_t n, Half* y) {
  std::vector<float> row(static_cast<size_t>(n));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < n; ++j) row[j] = acc[i * n + j] + (bias ? bias[j] : 0.0f);
    FloatsToHalves(row.data(), n, y + i * n);
  }
}

// Runs body(first_row, rows, x_chunk_as_float) over row chunks of X [m, k].
template <class T, class Body>
void ForRowChunks(const T* x, int64_t m, int64_t k, Body body) {
  FloatView xv;
  for (int64_t i0 = 0; i0 < m; i0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, m - i0);
    View(x + i0 * k, rows * k, xv);
    body(i0, rows, xv.data);
  }
}

}  // namespace

template <class T>
void CpuLowRank(const T* x, const T* a, const T* b, const T* bias, T* y, int64_t m, int64_t k, int64_t r,
                int64_t n) {
  if (m == 0) return;
  FloatView av, bv, biasv;
  View(a, k * r, av);
  View(b, r * n, bv);
  if (bias) View(bias, n, biasv);
  const int64_t chunk = std::min(m, kRowChunk);  // buffers for one chunk only: decode allocates 1 row
  std::vector<float> t(static_cast<size_t>(chunk * r)), acc(static_cast<size_t>(chunk * n));
  ForRowChunks(x, m, k, [&](int64_t i0, int64_t rows, const float* xf) {
    Gemm(rows, r, k, xf, k, av.data, r, t.data(), r);
    RoundToStorage(t.data(), rows * r, x);
    Gemm(rows, n, r, t.data(), r, bv.data, n, acc.data(), n);
    Store(acc.data(), biasv.data, rows, n, y + i0 * n);
  });
}

template <class T>
void CpuMonarch(const T* x, const T* w1, const T* w2, const T* bias, T* y, int64_t m, int64_t blocks, int64_t p,
                int64_t channels, int64_t q) {
  if (m == 0) return;
  const int64_t k = blocks * p, n = blocks * q, s = channels / blocks, width = blocks * channels;
  FloatView w1v, w2v, biasv;
  View(w1, blocks * p * channels, w1v);
  View(w2, blocks * channels * q, w2v);
  if (bias) View(bias, n, biasv);
  const int64_t chunk = std::min(m, kRowChunk);
  std::vector<float> z(static_cast<size_t>(chunk * channels)), zp(static_cast<size_t>(chunk * width)),
      acc(static_cast<size_t>(chunk * n));
  ForRowChunks(x, m, k, [&](int64_t i0, int64_t rows, const float* xf) {
    for (int64_t l = 0; l < blocks; ++l) {
      Gemm(rows, channels, p, xf + l * p, k, w1v.data + l * p * channels, channels, z.data(), channels);
      // Stride permutation: channel c = kb*s + t of input block l -> output block kb, position l*s + t.
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t kb = 0; kb < blocks; ++kb)
          std::memcpy(&zp[i * width + kb * channels + l * s], &z[i * channels + kb * s], sizeof(float) * s);
    }
    RoundToStorage(zp.data(), rows * width, x);
    for (int64_t kb = 0; kb < blocks; ++kb)
      Gemm(rows, q, channels, zp.data() + kb * channels, width, w2v.data + kb * channels * q, q,
           acc.data() + kb * q, n);
    Store(acc.data(), biasv.data, rows, n, y + i0 * n);
  });
}

template <class T>
void CpuBlast(const T* x, const T* u, const T* s, const T* v, const T* bias, T* y, int64_t m, int64_t blocks,
              int64_t p, int64_t r, int64_t q) {
  if (m == 0) return;
  const int64_t k = blocks * p, n = blocks * q, width = blocks * r;
  FloatView uv, sv, vv, biasv;
  View(u, blocks * r * q, uv);
  View(s, blocks * blocks * r, sv);
  View(v, blocks * p * r, vv);
  if (bias) View(bias, n, biasv);
  const int64_t chunk = std::min(m, kRowChunk);
  std::vector<float> h(static_cast<size_t>(chunk * width)), z(static_cast<size_t>(chunk * width)),
      acc(static_cast<size_t>(chunk * n));
  ForRowChunks(x, m, k, [&](int64_t i0, int64_t rows, const float* xf) {
    for (int64_t l = 0; l < blocks; ++l)  // h[i, l, :] = X_l · V[l]
      Gemm(rows, r, p, xf + l * p, k, vv.data + l * p * r, r, h.data() + l * r, width);
    std::fill(z.begin(), z.begin() + rows * width, 0.0f);
    for (int64_t i = 0; i < rows; ++i)  // z[i, kb, :] = sum_l h[i, l, :] * S[l, kb, :]
      for (int64_t l = 0; l < blocks; ++l)
        for (int64_t kb = 0; kb < blocks; ++kb) {
          const float* hl = &h[i * width + l * r];
          const float* slk = sv.data + (l * blocks + kb) * r;
          float* zk = &z[i * width + kb * r];
          for (int64_t t = 0; t < r; ++t) zk[t] += hl[t] * slk[t];
        }
    RoundToStorage(z.data(), rows * width, x);
    for (int64_t kb = 0; kb < blocks; ++kb)
      Gemm(rows, q, r, z.data() + kb * r, width, uv.data + kb * r * q, q, acc.data() + kb * q, n);
    Store(acc.data(), biasv.data, rows, n, y + i0 * n);
  });
}

template void CpuLowRank<float>(const float*, const float*, const float*, const float*, float*, int64_t, int64_t,
                                int64_t, int64_t);
template void CpuLowRank<Half>(const Half*, const Half*, const Half*, const Half*, Half*, int64_t, int64_t, int64_t,
                               int64_t);
template void CpuMonarch<float>(const float*, const float*, const float*, const float*, float*, int64_t, int64_t,
                                int64_t, int64_t, int64_t);
template void CpuMonarch<Half>(const Half*, const Half*, const Half*, const Half*, Half*, int64_t, int64_t, int64_t,
                               int64_t, int64_t);
template void CpuBlast<float>(const float*, const float*, const float*, const float*, const float*, float*, int64_t,
                              int64_t, int64_t, int64_t, int64_t);
template void CpuBlast<Half>(const Half*, const Half*, const Half*, const Half*, const Half*, Half*, int64_t, int64_t,
                             int64_t, int64_t, int64_t);

}  // namespace ec

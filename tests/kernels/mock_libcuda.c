/* A fake libcuda.so.1 for testing the launch path without a GPU (selected with EC_LIBCUDA).
 *
 * The device's compute capability comes from MOCK_SM (e.g. "87"), its opt-in shared-memory limit from
 * MOCK_SHARED_OPTIN (else the real one of that SM). cuModuleLoadData checks a cubin's ELF SM (low byte of
 * e_flags for ELF ABI 7, bits 8..15 for ABI 8) or a PTX image's .target; MOCK_REFUSE_CUBIN=1 and
 * MOCK_REFUSE_PTX=1 make it refuse those. cuLaunchKernel logs what it was given and evaluates the kernel
 * on host memory with a small C reference that reads params[] in Triton's order, so a wrong order gives a
 * wrong answer. Device pointers are host pointers here. mock_set_dtype() says which storage dtype the
 * buffers hold (the cubin itself does not say); mock_log() returns the log, mock_reset() clears it and
 * starts new contexts (so modules load again).
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
enum { OK = 0, ERR_INVALID_VALUE = 1, ERR_INVALID_IMAGE = 200, ERR_NO_BINARY_FOR_GPU = 209, ERR_INVALID_PTX = 218,
       ERR_NOT_FOUND = 500 };

static char log_buf[1 << 16];
static size_t log_len;
static int dtype = 1; /* ONNX codes: 1 fp32, 10 fp16, 16 bf16 */

static void logf_(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (log_len < sizeof log_buf) log_len += vsnprintf(log_buf + log_len, sizeof log_buf - log_len, fmt, ap);
  if (log_len > sizeof log_buf) log_len = sizeof log_buf;
  va_end(ap);
}

void mock_set_dtype(int code) { dtype = code; }
const char* mock_log(void) { return log_buf; }
static int generation;
void mock_reset(void) { log_len = 0; log_buf[0] = 0; ++generation; }

static int device_sm(void) {
  const char* s = getenv("MOCK_SM");
  return s ? atoi(s) : 87;
}

/* Contexts: one per (generation, SM) so the library's per-context module cache cannot mix SMs, and
 * mock_reset() starts a new generation: the next launch loads its module again. */
static char contexts[64][128];
static void* current = NULL;
#define CONTEXT (&contexts[generation % 64][device_sm() % 128])

CUresult cuInit(unsigned flags) { (void)flags; return OK; }
CUresult cuGetErrorString(CUresult code, const char** text) {
  switch (code) {
    case ERR_NO_BINARY_FOR_GPU: *text = "CUDA_ERROR_NO_BINARY_FOR_GPU"; break;
    case ERR_INVALID_PTX: *text = "CUDA_ERROR_INVALID_PTX"; break;
    case ERR_INVALID_IMAGE: *text = "CUDA_ERROR_INVALID_IMAGE"; break;
    case ERR_INVALID_VALUE: *text = "CUDA_ERROR_INVALID_VALUE"; break;
    default: *text = "mock error";
  }
  return OK;
}
CUresult cuStreamGetCtx(void* stream, void** ctx) { (void)stream; *ctx = CONTEXT; return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = current ? current : CONTEXT; return OK; }
CUresult cuCtxPushCurrent_v2(void* ctx) { logf_("cuCtxPushCurrent\n"); current = ctx; return OK; }
CUresult cuCtxPopCurrent_v2(void** ctx) { logf_("cuCtxPopCurrent\n"); if (ctx) *ctx = current; current = NULL; return OK; }
CUresult cuCtxGetDevice(int* device) { *device = 0; return OK; }
CUresult cuDeviceGetAttribute(int* value, int attr, int device) {
  (void)device;
  int sm = device_sm();
  if (attr == 75) *value = sm / 10;
  else if (attr == 76) *value = sm % 10;
  else if (attr == 97 && getenv("MOCK_SHARED_OPTIN")) *value = atoi(getenv("MOCK_SHARED_OPTIN"));
  else if (attr == 97) *value = sm == 90 ? 232448 : (sm == 80 || sm == 87) ? 166912 : sm == 75 ? 65536 : 101376;
  else return ERR_INVALID_VALUE;
  return OK;
}

typedef struct { int from_ptx; int dynamic_shared_limit; char name[64]; } Module;
static Module modules[512];
static int n_modules;

static uint64_t fnv1a(const unsigned char* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

CUresult cuModuleLoadData(void** module, const void* image) {
  const unsigned char* p = image;
  int sm = device_sm();
  if (n_modules == 512) return ERR_INVALID_VALUE;
  if (p[0] == 0x7f && p[1] == 'E' && p[2] == 'L' && p[3] == 'F') {
    int abi = p[8];
    uint32_t flags;
    memcpy(&flags, p + 48, 4); /* Elf64_Ehdr.e_flags */
    int elf_sm = abi >= 8 ? (flags >> 8) & 0xff : flags & 0xff;
    uint64_t shoff, phoff, size;
    uint16_t phentsize, phnum, shentsize, shnum;
    memcpy(&phoff, p + 32, 8);
    memcpy(&shoff, p + 40, 8);
    memcpy(&phentsize, p + 54, 2);
    memcpy(&phnum, p + 56, 2);
    memcpy(&shentsize, p + 58, 2);
    memcpy(&shnum, p + 60, 2);
    /* The image's size (cuModuleLoadData gets none): the furthest end of any header table or section. */
    size = shoff + (uint64_t)shentsize * shnum;
    if (phoff + (uint64_t)phentsize * phnum > size) size = phoff + (uint64_t)phentsize * phnum;
    for (int i = 0; i < shnum; ++i) {
      const unsigned char* sh = p + shoff + (uint64_t)i * shentsize;
      uint32_t type;
      uint64_t offset, bytes;
      memcpy(&type, sh + 4, 4);
      memcpy(&offset, sh + 24, 8);
      memcpy(&bytes, sh + 32, 8);
      if (type != 8 /* SHT_NOBITS */ && offset + bytes > size) size = offset + bytes;
    }
    logf_("cuModuleLoadData cubin abi=%d sm=%d bytes=%llu fnv=%016llx\n", abi, elf_sm, (unsigned long long)size,
          (unsigned long long)fnv1a(p, size));
    if (getenv("MOCK_REFUSE_CUBIN") && atoi(getenv("MOCK_REFUSE_CUBIN"))) return ERR_INVALID_IMAGE;
    if (elf_sm != sm) return ERR_NO_BINARY_FOR_GPU;
    modules[n_modules].from_ptx = 0;
  } else {
    const char* target = strstr((const char*)p, ".target sm_");
    int ptx_sm = target ? atoi(target + 11) : 0;
    int arch_specific = target && strncmp(target + 13, "a", 1) == 0;
    logf_("cuModuleLoadData ptx target=sm_%d%s\n", ptx_sm, arch_specific ? "a" : "");
    if (getenv("MOCK_REFUSE_PTX") && atoi(getenv("MOCK_REFUSE_PTX"))) return ERR_INVALID_PTX;
    if (!target || ptx_sm > sm || (arch_specific && ptx_sm != sm)) return ERR_NO_BINARY_FOR_GPU;
    modules[n_modules].from_ptx = 1;
  }
  modules[n_modules].dynamic_shared_limit = 48 * 1024;
  *module = &modules[n_modules++];
  return OK;
}

CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
  Module* m = module;
  logf_("cuModuleGetFunction %s\n", name);
  snprintf(m->name, sizeof m->name, "%s", name);
  *function = m;
  return OK;
}

CUresult cuFuncSetAttribute(void* function, int attr, int value) {
  Module* m = function;
  logf_("cuFuncSetAttribute %d %d\n", attr, value);
  if (attr != 8) return ERR_INVALID_VALUE;
  m->dynamic_shared_limit = value;
  return OK;
}

/* Storage dtypes <-> double (round to nearest even). */
static double half_to_double(uint16_t h) {
  int e = (h >> 10) & 0x1f, f = h & 0x3ff;
  double v = e == 0 ? ldexp(f, -24) : e == 31 ? (f ? NAN : INFINITY) : ldexp(f + 1024, e - 25);
  return (h & 0x8000) ? -v : v;
}
static uint16_t double_to_half(double v) {
  float f = (float)v;
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  float a = fabsf(f);
  if (isnan(a)) return sign | 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;
  if (a < ldexpf(1, -14)) return sign | (uint16_t)nearbyintf(a * ldexpf(1, 24));  /* subnormal */
  int e;
  float m = frexpf(a, &e);                     /* a = m * 2^e, m in [0.5, 1) */
  uint32_t mant = (uint32_t)nearbyintf(m * 2048.0f);  /* 11 significant bits */
  if (mant == 2048) { mant = 1024; e += 1; }
  if (e + 14 >= 31) return sign | 0x7c00;
  return sign | ((uint32_t)(e + 14) << 10) | (mant - 1024);
}
static double load(const void* base, int64_t i) {
  if (dtype == 1) return ((const float*)base)[i];
  uint16_t h = ((const uint16_t*)base)[i];
  if (dtype == 10) return half_to_double(h);
  uint32_t x = (uint32_t)h << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}
static void store(void* base, int64_t i, double v) {
  if (dtype == 1) { ((float*)base)[i] = (float)v; return; }
  if (dtype == 10) { ((uint16_t*)base)[i] = double_to_half(v); return; }
  float f = (float)v;
  uint32_t x;
  memcpy(&x, &f, 4);
  x += 0x7fff + ((x >> 16) & 1);
  ((uint16_t*)base)[i] = (uint16_t)(x >> 16);
}
static double rounded(double v) {
  char tmp[4];
  store(tmp, 0, v);
  return load(tmp, 0);
}

#define PTR(i) (*(void**)params[i])
#define I32(i) (*(const int32_t*)params[i])

static void gemm_ref(const void* x, const void* w, const void* bias, void* y, int M, int K, int N, int has_bias) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double acc = has_bias ? load(bias, j) : 0;
      for (int k = 0; k < K; ++k) acc += load(x, (int64_t)i * K + k) * load(w, (int64_t)k * N + j);
      store(y, (int64_t)i * N + j, acc);
    }
}

/* Returns the number of runtime parameters of the kernel, or -1 if unknown. */
static int evaluate(const char* name, void** params) {
  if (!strcmp(name, "lowrank_fused_kernel")) {
    void *x = PTR(0), *a = PTR(1), *b = PTR(2), *bias = PTR(3), *y = PTR(4);
    int M = I32(5), K = I32(6), R = I32(7), N = I32(8), has_bias = I32(9);
    double* t = malloc(sizeof(double) * (size_t)R);
    for (int i = 0; i < M; ++i) {
      for (int r = 0; r < R; ++r) {
        double acc = 0;
        for (int k = 0; k < K; ++k) acc += load(x, (int64_t)i * K + k) * load(a, (int64_t)k * R + r);
        t[r] = rounded(acc);
      }
      for (int j = 0; j < N; ++j) {
        double acc = has_bias ? load(bias, j) : 0;
        for (int r = 0; r < R; ++r) acc += t[r] * load(b, (int64_t)r * N + j);
        store(y, (int64_t)i * N + j, acc);
      }
    }
    free(t);
    return 10;
  }
  if (!strcmp(name, "gemm_kernel")) {
    gemm_ref(PTR(0), PTR(1), PTR(2), PTR(3), I32(4), I32(5), I32(6), I32(7));
    return 8;
  }
  if (!strcmp(name, "monarch_permute_kernel")) {
    void *x = PTR(0), *w1 = PTR(1), *zp = PTR(2);
    int M = I32(3), NB = I32(4), P = I32(5), R = I32(6), s = R / NB;
    for (int i = 0; i < M; ++i)
      for (int l = 0; l < NB; ++l)
        for (int c = 0; c < R; ++c) {
          double acc = 0;
          for (int k = 0; k < P; ++k)
            acc += load(x, (int64_t)i * NB * P + l * P + k) * load(w1, (int64_t)l * P * R + (int64_t)k * R + c);
          store(zp, (int64_t)i * NB * R + (c / s) * R + l * s + c % s, acc);
        }
    return 7;
  }
  if (!strcmp(name, "block_diag_kernel")) {
    void *z = PTR(0), *w = PTR(1), *bias = PTR(2), *y = PTR(3);
    int M = I32(4), NB = I32(5), C = I32(6), Q = I32(7), has_bias = I32(8);
    for (int i = 0; i < M; ++i)
      for (int k = 0; k < NB; ++k)
        for (int j = 0; j < Q; ++j) {
          double acc = has_bias ? load(bias, (int64_t)k * Q + j) : 0;
          for (int c = 0; c < C; ++c)
            acc += load(z, (int64_t)i * NB * C + k * C + c) * load(w, (int64_t)k * C * Q + (int64_t)c * Q + j);
          store(y, (int64_t)i * NB * Q + k * Q + j, acc);
        }
    return 9;
  }
  if (!strcmp(name, "blast_partial_kernel")) {
    void *x = PTR(0), *v = PTR(1), *s = PTR(2), *z = PTR(3);
    int M = I32(4), NB = I32(5), P = I32(6), R = I32(7);
    double* acc = calloc((size_t)NB * R, sizeof(double));
    for (int i = 0; i < M; ++i) {
      memset(acc, 0, sizeof(double) * (size_t)NB * R);
      for (int l = 0; l < NB; ++l)
        for (int r = 0; r < R; ++r) {
          double y = 0;
          for (int k = 0; k < P; ++k)
            y += load(x, (int64_t)i * NB * P + l * P + k) * load(v, (int64_t)l * P * R + (int64_t)k * R + r);
          for (int k = 0; k < NB; ++k) acc[k * R + r] += y * load(s, (int64_t)l * NB * R + k * R + r);
        }
      for (int k = 0; k < NB; ++k)
        for (int r = 0; r < R; ++r) store(z, (int64_t)i * NB * R + k * R + r, acc[k * R + r]);
    }
    free(acc);
    return 8;
  }
  return -1;
}

CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void* stream, void** params, void** extra) {
  Module* m = function;
  (void)stream;
  if (extra) return ERR_INVALID_VALUE;
  if ((int)shared > m->dynamic_shared_limit) {
    logf_("cuLaunchKernel refused: shared %u > limit %d\n", shared, m->dynamic_shared_limit);
    return ERR_INVALID_VALUE;
  }
  int n_args = evaluate(m->name, params);
  if (n_args < 0) return ERR_NOT_FOUND;
  /* Triton's two hidden scratch pointers follow the arguments; the library passes null ones. */
  int scratch_null = *(void**)params[n_args] == NULL && *(void**)params[n_args + 1] == NULL;
  logf_("cuLaunchKernel %s grid=(%u,%u,%u) block=(%u,%u,%u) shared=%u params=%d scratch=%s ptx=%d\n", m->name, gx, gy,
        gz, bx, by, bz, shared, n_args + 2, scratch_null ? "null" : "SET", m->from_ptx);
  return scratch_null ? OK : ERR_INVALID_VALUE;
}

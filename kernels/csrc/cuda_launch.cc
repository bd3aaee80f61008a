// CUDA driver-API launch path of the Triton cubins (implements cuda_launch.h).
//
// libcuda is dlopen'd once (EC_LIBCUDA overrides "libcuda.so.1", for the test mock), so the library
// loads and its CPU kernels run on machines without a driver. Per launch: push the stream's context,
// pick the cubin for the device's exact SM (PTX fallback if the driver refuses it), check shared memory
// and i32 index ranges, pass Triton's parameters plus its two hidden scratch pointers (null: the
// generator refuses kernels that need scratch), and launch with block = 32 * num_warps.
#include "cuda_launch.h"

#include <dlfcn.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#if !defined(EC_NO_CUBINS) && __has_include("ec_cubins.h")
#include "ec_cubins.h"
#define EC_HAVE_CUBINS 1
#else
#define EC_HAVE_CUBINS 0
#define EC_CUBIN_COUNT 0
#endif

namespace ec {
namespace {

// The few driver-API types and constants used (values from cuda.h; no CUDA headers needed).
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
constexpr int kAttrCcMajor = 75;                 // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kAttrCcMinor = 76;
constexpr int kAttrSharedOptin = 97;             // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
constexpr int kFuncAttrMaxDynamicShared = 8;     // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
constexpr int kDefaultSharedLimit = 48 * 1024;   // above this a kernel must opt in
constexpr int kMaxGridYZ = 65535;

struct Driver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuStreamGetCtx)(CUstream, CUcontext*);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext*);
  CUresult (*cuCtxGetDevice)(CUdevice*);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**);
};

std::string ErrorText(const Driver& d, CUresult code) {
  const char* text = nullptr;
  if (d.cuGetErrorString && d.cuGetErrorString(code, &text) == 0 && text) return std::string(text) + " (" + std::to_string(code) + ")";
  return "CUDA error " + std::to_string(code);
}

// Loads libcuda and runs cuInit once per process; returns the driver or sets *error.
const Driver* LoadDriver(std::string* error) {
  static Driver driver;
  static std::string load_error;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* override_path = std::getenv("EC_LIBCUDA");
    const char* path = override_path && *override_path ? override_path : "libcuda.so.1";
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      load_error = std::string("cannot dlopen ") + path + ": " + (why ? why : "unknown error") +
                   " (no NVIDIA driver on this machine?)";
      return;
    }
    struct Symbol { void** slot; const char* name; };
    const Symbol symbols[] = {
        {reinterpret_cast<void**>(&driver.cuInit), "cuInit"},
        {reinterpret_cast<void**>(&driver.cuGetErrorString), "cuGetErrorString"},
        {reinterpret_cast<void**>(&driver.cuStreamGetCtx), "cuStreamGetCtx"},
        {reinterpret_cast<void**>(&driver.cuCtxGetCurrent), "cuCtxGetCurrent"},
        {reinterpret_cast<void**>(&driver.cuCtxPushCurrent), "cuCtxPushCurrent_v2"},
        {reinterpret_cast<void**>(&driver.cuCtxPopCurrent), "cuCtxPopCurrent_v2"},
        {reinterpret_cast<void**>(&driver.cuCtxGetDevice), "cuCtxGetDevice"},
        {reinterpret_cast<void**>(&driver.cuDeviceGetAttribute), "cuDeviceGetAttribute"},
        {reinterpret_cast<void**>(&driver.cuModuleLoadData), "cuModuleLoadData"},
        {reinterpret_cast<void**>(&driver.cuModuleGetFunction), "cuModuleGetFunction"},
        {reinterpret_cast<void**>(&driver.cuFuncSetAttribute), "cuFuncSetAttribute"},
        {reinterpret_cast<void**>(&driver.cuLaunchKernel), "cuLaunchKernel"},
    };
    for (const Symbol& s : symbols) {
      *s.slot = dlsym(lib, s.name);
      if (!*s.slot) {
        load_error = std::string(path) + " has no " + s.name + " (driver too old?)";
        return;
      }
    }
    CUresult rc = driver.cuInit(0);
    if (rc != 0) load_error = "cuInit failed: " + ErrorText(driver, rc);
  });
  if (!load_error.empty()) {
    *error = load_error;
    return nullptr;
  }
  return &driver;
}

// Pops the pushed context when the launch scope ends, whatever the outcome.
class ContextScope {
 public:
  ContextScope(const Driver& d, CUcontext ctx) : d_(d) { pushed_ = ctx && d.cuCtxPushCurrent(ctx) == 0; }
  ~ContextScope() {
    CUcontext ignored;
    if (pushed_) d_.cuCtxPopCurrent(&ignored);
  }
  bool pushed() const { return pushed_; }

 private:
  const Driver& d_;
  bool pushed_ = false;
};

[[maybe_unused]] const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown dtype";
}

size_t ElementBytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

bool KnownDType(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

[[maybe_unused]] std::string ShippedSms() {
#if EC_HAVE_CUBINS
  std::set<int> sms;
  for (const EcCubin& c : kEcCubins)
    if (c.cubin) sms.insert(c.sm);
  std::string list;
  for (int sm : sms) list += (list.empty() ? "sm_" : ", sm_") + std::to_string(sm);
  return list.empty() ? "none" : list;
#else
  return "none";
#endif
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A kernel ready to launch in the current context.
struct Resolved {
  CUfunction function = nullptr;
  int num_warps = 0;
  int shared = 0;
  int num_params = 0;
  int tiles[4] = {0, 0, 0, 0};
};

// One launch: the resolved kernel, its grid and its runtime arguments (pointers and i32s, in order).
struct Launch {
  Resolved kernel;
  int64_t grid[3];
  std::vector<CUdeviceptr> pointers;  // stable storage: params[] points into these
  std::vector<int32_t> ints;
  std::vector<char> kinds;            // 'p' or 'i', Triton's parameter order
};

class Launcher {
 public:
  // Binds the stream's context (or the current one for a null stream) and the device's SM.
  std::string Begin(void* stream) {
    driver_ = LoadDriver(&error_);
    if (!driver_) return error_;
    stream_ = static_cast<CUstream>(stream);
    CUresult rc = stream_ ? driver_->cuStreamGetCtx(stream_, &ctx_) : driver_->cuCtxGetCurrent(&ctx_);
    if (rc != 0) return std::string(stream_ ? "cuStreamGetCtx" : "cuCtxGetCurrent") + " failed: " + ErrorText(*driver_, rc);
    if (!ctx_) return "no current CUDA context (null stream and nothing bound to this thread)";
    scope_.reset(new ContextScope(*driver_, ctx_));
    if (!scope_->pushed()) return "cuCtxPushCurrent failed for the stream's context";
    CUdevice device = 0;
    int major = 0, minor = 0;
    if ((rc = driver_->cuCtxGetDevice(&device)) != 0) return "cuCtxGetDevice failed: " + ErrorText(*driver_, rc);
    if ((rc = driver_->cuDeviceGetAttribute(&major, kAttrCcMajor, device)) != 0 ||
        (rc = driver_->cuDeviceGetAttribute(&minor, kAttrCcMinor, device)) != 0 ||
        (rc = driver_->cuDeviceGetAttribute(&shared_optin_, kAttrSharedOptin, device)) != 0)
      return "cuDeviceGetAttribute failed: " + ErrorText(*driver_, rc);
    sm_ = major * 10 + minor;
    return "";
  }

  // The cubin of `kernel` for this device's exact SM, loaded once per context.
  std::string Resolve(const char* kernel, DType dtype, const char* config, Resolved* out) {
#if EC_HAVE_CUBINS
    const EcCubin* entry = nullptr;
    bool sm_shipped = false;
    for (const EcCubin& c : kEcCubins) {
      if (!c.cubin || c.sm != sm_) continue;
      sm_shipped = true;
      if (c.dtype == static_cast<int>(dtype) && !std::strcmp(c.kernel, kernel) && !std::strcmp(c.config, config)) entry = &c;
    }
    if (!sm_shipped)
      return "no cubin for this GPU's sm_" + std::to_string(sm_) + "; this library ships " + ShippedSms();
    if (!entry)
      return std::string("no ") + kernel + " " + DTypeName(dtype) + " cubin (config " + config + ") for sm_" +
             std::to_string(sm_) + " in this build";
    if (entry->shared_bytes > shared_optin_)
      return std::string(kernel) + " needs " + std::to_string(entry->shared_bytes) + " B of shared memory; this sm_" +
             std::to_string(sm_) + " device allows " + std::to_string(shared_optin_);
    CUfunction function = nullptr;
    std::string error = LoadFunction(*entry, &function);
    if (!error.empty()) return error;
    out->function = function;
    out->num_warps = entry->num_warps;
    out->shared = entry->shared_bytes;
    out->num_params = entry->num_params;
    std::memcpy(out->tiles, entry->tiles, sizeof(out->tiles));
    return "";
#else
    (void)kernel, (void)dtype, (void)config, (void)out;
    return "this library was built without cubins (run `make kernels` before building it)";
#endif
  }

  std::string Run(Launch& launch) {
    for (int i = 0; i < 3; ++i)
      if (launch.grid[i] == 0) return "";  // empty grid: nothing to do
    if (launch.grid[0] > INT_MAX || launch.grid[1] > kMaxGridYZ || launch.grid[2] > kMaxGridYZ)
      return "grid (" + std::to_string(launch.grid[0]) + ", " + std::to_string(launch.grid[1]) + ", " +
             std::to_string(launch.grid[2]) + ") exceeds CUDA's limits";
    std::vector<void*> params;
    size_t next_pointer = 0, next_int = 0;
    for (char kind : launch.kinds)
      params.push_back(kind == 'p' ? static_cast<void*>(&launch.pointers[next_pointer++])
                                   : static_cast<void*>(&launch.ints[next_int++]));
    static CUdeviceptr null_scratch[2] = {0, 0};  // Triton's global and profile scratch: unused
    params.push_back(&null_scratch[0]);
    params.push_back(&null_scratch[1]);
    if (static_cast<int>(params.size()) != launch.kernel.num_params)
      return "parameter count " + std::to_string(params.size()) + " does not match the cubin's " +
             std::to_string(launch.kernel.num_params);
    CUresult rc = driver_->cuLaunchKernel(
        launch.kernel.function, static_cast<unsigned>(launch.grid[0]), static_cast<unsigned>(launch.grid[1]),
        static_cast<unsigned>(launch.grid[2]), 32u * launch.kernel.num_warps, 1, 1,
        static_cast<unsigned>(launch.kernel.shared), stream_, params.data(), nullptr);
    return rc == 0 ? "" : "cuLaunchKernel failed: " + ErrorText(*driver_, rc);
  }

 private:
#if EC_HAVE_CUBINS
  std::string LoadFunction(const EcCubin& entry, CUfunction* function) {
    static std::mutex mutex;
    static std::map<std::pair<CUcontext, const EcCubin*>, CUfunction> cache;
    std::lock_guard<std::mutex> lock(mutex);
    auto hit = cache.find({ctx_, &entry});
    if (hit != cache.end()) {
      *function = hit->second;
      return "";
    }
    CUmodule module = nullptr;
    CUresult rc = driver_->cuModuleLoadData(&module, entry.cubin);
    if (rc != 0) {  // e.g. CUDA_ERROR_NO_BINARY_FOR_GPU or an image this driver refuses: JIT the PTX
      CUresult ptx_rc = driver_->cuModuleLoadData(&module, entry.ptx);
      if (ptx_rc != 0)
        return std::string("the driver refused the sm_") + std::to_string(entry.sm) + " cubin of " + entry.kernel +
               " (" + ErrorText(*driver_, rc) + ") and its PTX fallback (" + ErrorText(*driver_, ptx_rc) +
               "); a newer NVIDIA driver may be needed";
    }
    if ((rc = driver_->cuModuleGetFunction(function, module, entry.function)) != 0)
      return std::string("cuModuleGetFunction(") + entry.function + ") failed: " + ErrorText(*driver_, rc);
    if (entry.shared_bytes > kDefaultSharedLimit &&
        (rc = driver_->cuFuncSetAttribute(*function, kFuncAttrMaxDynamicShared, entry.shared_bytes)) != 0)
      return "cuFuncSetAttribute(max dynamic shared) failed: " + ErrorText(*driver_, rc);
    cache[{ctx_, &entry}] = *function;
    return "";
  }
#endif

  const Driver* driver_ = nullptr;
  std::string error_;
  CUstream stream_ = nullptr;
  CUcontext ctx_ = nullptr;
  std::unique_ptr<ContextScope> scope_;
  int sm_ = 0;
  int shared_optin_ = 0;
};

// Every index a kernel computes is i32: each product of extents (rows padded by a tile) must fit.
std::string CheckI32(std::initializer_list<std::pair<int64_t, int64_t>> products) {
  constexpr int64_t kRowSlack = 256;  // the largest BLOCK_M: masked rows still form offsets
  for (const auto& p : products) {
    if (p.first < 0 || p.second < 0) return "negative dimension";
    if ((p.first + kRowSlack) > INT32_MAX / (p.second > 0 ? p.second : 1))
      return "a tensor of " + std::to_string(p.first) + " x " + std::to_string(p.second) +
             " elements is too large for the kernels' 32-bit indexing";
  }
  return "";
}

std::string CheckCommon(DType dtype, const void* x, const void* y, int64_t m) {
  if (!KnownDType(dtype)) return "unsupported dtype code " + std::to_string(static_cast<int>(dtype)) + " (float32, float16 or bfloat16)";
  if (m < 0) return "negative row count";
  if (m > 0 && (!x || !y)) return "null input or output pointer";
  return "";
}

// Allocation that is handed back when the op returns (launches are already queued on the stream).
class ScopedWorkspace {
 public:
  ScopedWorkspace(const Workspace& ws, size_t bytes) : ws_(ws), ptr_(bytes && ws.alloc ? ws.alloc(ws.self, bytes) : nullptr) {}
  ~ScopedWorkspace() {
    if (ptr_ && ws_.release) ws_.release(ws_.self, ptr_);
  }
  void* get() const { return ptr_; }

 private:
  const Workspace& ws_;
  void* ptr_;
};

CUdeviceptr Ptr(const void* p) { return reinterpret_cast<CUdeviceptr>(p); }

Launch MakeLaunch(const Resolved& kernel, int64_t gx, int64_t gy, int64_t gz, std::vector<CUdeviceptr> pointers,
                  std::vector<int32_t> ints, const char* kinds) {
  Launch l;
  l.kernel = kernel;
  l.grid[0] = gx, l.grid[1] = gy, l.grid[2] = gz;
  l.pointers = std::move(pointers);
  l.ints = std::move(ints);
  l.kinds.assign(kinds, kinds + std::strlen(kinds));
  return l;
}

#if EC_HAVE_CUBINS
// configs.lowrank_path: "m16"/"m64" fused, nullptr = the two-kernel path. block_n of each fused config
// comes from the table (tiles[1]).
const char* LowRankPath(int64_t m, int64_t k, int64_t r, int64_t n, int block_n_m16, int block_n_m64) {
  const char* config = m <= EC_LOWRANK_SMALL_M_MAX ? "m16" : m <= EC_LOWRANK_FUSED_M_MAX ? "m64" : nullptr;
  if (!config) return nullptr;
  int64_t block_n = config[1] == '1' ? block_n_m16 : block_n_m64;
  double reread = static_cast<double>(CeilDiv(n, block_n)) * k * r;
  return reread <= EC_LOWRANK_FUSED_MAX_REREAD * (static_cast<double>(k) * r + static_cast<double>(r) * n) ? config : nullptr;
}

int FusedBlockN(const char* config) {
  for (const EcCubin& c : kEcCubins)
    if (c.cubin && !std::strcmp(c.kernel, "lowrank_fused_kernel") && !std::strcmp(c.config, config)) return c.tiles[1];
  return 1;
}
#endif

}  // namespace

// Workspace sizes (bytes) the ops ask for; also used by c_api.cc.
size_t LowRankWorkspaceBytes(DType dtype, int64_t m, int64_t k, int64_t r, int64_t n) {
#if EC_HAVE_CUBINS
  if (m <= 0 || LowRankPath(m, k, r, n, FusedBlockN("m16"), FusedBlockN("m64"))) return 0;
  return static_cast<size_t>(m) * r * ElementBytes(dtype);
#else
  (void)dtype, (void)m, (void)k, (void)r, (void)n;
  return 0;
#endif
}

size_t BlockWorkspaceBytes(DType dtype, int64_t m, int64_t blocks, int64_t channels) {
  return m <= 0 ? 0 : static_cast<size_t>(m) * blocks * channels * ElementBytes(dtype);
}

std::string CudaLowRank(DType dtype, void* stream, const void* x, const void* a, const void* b, const void* bias,
                        void* y, int64_t m, int64_t k, int64_t r, int64_t n, const Workspace& workspace) {
  std::string error = CheckCommon(dtype, x, y, m);
  if (error.empty() && (k <= 0 || r <= 0 || n <= 0)) error = "K, R and N must be positive";
  if (error.empty()) error = CheckI32({{m, k}, {m, n}, {m, r}, {k, r}, {r, n}});
  if (!error.empty() || m == 0) return error;
#if EC_HAVE_CUBINS
  Launcher launcher;
  if (!(error = launcher.Begin(stream)).empty()) return error;
  const void* bias_arg = bias ? bias : y;  // never read when has_bias == 0
  const int32_t has_bias = bias != nullptr;
  const char* path = LowRankPath(m, k, r, n, FusedBlockN("m16"), FusedBlockN("m64"));
  if (path) {
    Resolved fused;
    if (!(error = launcher.Resolve("lowrank_fused_kernel", dtype, path, &fused)).empty()) return error;
    Launch l = MakeLaunch(fused, CeilDiv(m, fused.tiles[0]), CeilDiv(n, fused.tiles[1]), 1,
                          {Ptr(x), Ptr(a), Ptr(b), Ptr(bias_arg), Ptr(y)},
                          {int32_t(m), int32_t(k), int32_t(r), int32_t(n), has_bias}, "pppppiiiii");
    return launcher.Run(l);
  }
  Resolved gemm;
  const char* gemm_config = m <= EC_LOWRANK_SMALL_M_MAX ? "m16" : "m128";  // configs.gemm_config
  if (!(error = launcher.Resolve("gemm_kernel", dtype, gemm_config, &gemm)).empty()) return error;
  size_t bytes = static_cast<size_t>(m) * r * ElementBytes(dtype);
  ScopedWorkspace t(workspace, bytes);
  if (!t.get()) return "could not allocate a " + std::to_string(bytes) + "-byte workspace for X·A";
  Launch first = MakeLaunch(gemm, CeilDiv(m, gemm.tiles[0]), CeilDiv(r, gemm.tiles[1]), 1,
                            {Ptr(x), Ptr(a), Ptr(t.get()), Ptr(t.get())}, {int32_t(m), int32_t(k), int32_t(r), 0},
                            "ppppiiii");
  Launch second = MakeLaunch(gemm, CeilDiv(m, gemm.tiles[0]), CeilDiv(n, gemm.tiles[1]), 1,
                             {Ptr(t.get()), Ptr(b), Ptr(bias_arg), Ptr(y)},
                             {int32_t(m), int32_t(r), int32_t(n), has_bias}, "ppppiiii");
  if (!(error = launcher.Run(first)).empty()) return error;
  return launcher.Run(second);
#else
  (void)stream, (void)a, (void)b, (void)bias, (void)workspace;
  return "this library was built without cubins (run `make kernels` before building it)";
#endif
}

namespace {
// The second product of Monarch and BLAST: Y[:, k·q:(k+1)·q] = Z[:, k, :]·W[k] (+ bias).
[[maybe_unused]] Launch BlockDiagLaunch(const Resolved& k, const void* z, const void* w, const void* bias, void* y, int64_t m,
                       int64_t blocks, int64_t channels, int64_t q) {
  return MakeLaunch(k, CeilDiv(m, k.tiles[0]), CeilDiv(q, k.tiles[1]), blocks,
                    {Ptr(z), Ptr(w), Ptr(bias ? bias : y), Ptr(y)},
                    {int32_t(m), int32_t(blocks), int32_t(channels), int32_t(q), int32_t(bias != nullptr)},
                    "ppppiiiii");
}
}  // namespace

std::string CudaMonarch(DType dtype, void* stream, const void* x, const void* w1, const void* w2, const void* bias,
                        void* y, int64_t m, int64_t blocks, int64_t p, int64_t channels, int64_t q,
                        const Workspace& workspace) {
  std::string error = CheckCommon(dtype, x, y, m);
  if (error.empty() && (blocks <= 0 || p <= 0 || channels <= 0 || q <= 0)) error = "b, p, R and q must be positive";
  if (error.empty() && channels % blocks) error = "R=" + std::to_string(channels) + " channels is not a multiple of b=" + std::to_string(blocks);
  if (error.empty() && blocks > kMaxGridYZ) error = "too many blocks";
  if (error.empty()) error = CheckI32({{m, blocks * p}, {m, blocks * channels}, {m, blocks * q}, {blocks * p, channels}, {blocks * channels, q}});
  if (!error.empty() || m == 0) return error;
#if EC_HAVE_CUBINS
  Launcher launcher;
  Resolved first, second;
  if (!(error = launcher.Begin(stream)).empty() ||
      !(error = launcher.Resolve("monarch_permute_kernel", dtype, "m64", &first)).empty() ||
      !(error = launcher.Resolve("block_diag_kernel", dtype, "m64", &second)).empty())
    return error;
  size_t bytes = BlockWorkspaceBytes(dtype, m, blocks, channels);
  ScopedWorkspace zp(workspace, bytes);
  if (!zp.get()) return "could not allocate a " + std::to_string(bytes) + "-byte workspace for Zp";
  Launch permute = MakeLaunch(first, CeilDiv(m, first.tiles[0]), CeilDiv(channels, first.tiles[1]), blocks,
                              {Ptr(x), Ptr(w1), Ptr(zp.get())},
                              {int32_t(m), int32_t(blocks), int32_t(p), int32_t(channels)}, "pppiiii");
  Launch mix = BlockDiagLaunch(second, zp.get(), w2, bias, y, m, blocks, channels, q);
  if (!(error = launcher.Run(permute)).empty()) return error;
  return launcher.Run(mix);
#else
  (void)stream, (void)w1, (void)w2, (void)bias, (void)workspace;
  return "this library was built without cubins (run `make kernels` before building it)";
#endif
}

std::string CudaBlast(DType dtype, void* stream, const void* x, const void* u, const void* s, const void* v,
                      const void* bias, void* y, int64_t m, int64_t blocks, int64_t p, int64_t r, int64_t q,
                      const Workspace& workspace) {
  std::string error = CheckCommon(dtype, x, y, m);
  if (error.empty() && (blocks <= 0 || p <= 0 || r <= 0 || q <= 0)) error = "b, p, r and q must be positive";
#if EC_HAVE_CUBINS
  if (error.empty() && blocks > EC_BLAST_MAX_BLOCKS)
    error = "b=" + std::to_string(blocks) + " blocks; the CUDA kernel supports at most " + std::to_string(EC_BLAST_MAX_BLOCKS);
#endif
  if (error.empty()) error = CheckI32({{m, blocks * p}, {m, blocks * r}, {m, blocks * q}, {blocks * p, r}, {blocks * r, q}, {blocks * blocks, r}});
  if (!error.empty() || m == 0) return error;
#if EC_HAVE_CUBINS
  const char* config = blocks <= 4 ? "b4" : blocks <= 8 ? "b8" : "b16";
  Launcher launcher;
  Resolved first, second;
  if (!(error = launcher.Begin(stream)).empty() ||
      !(error = launcher.Resolve("blast_partial_kernel", dtype, config, &first)).empty() ||
      !(error = launcher.Resolve("block_diag_kernel", dtype, "m64", &second)).empty())
    return error;
  size_t bytes = BlockWorkspaceBytes(dtype, m, blocks, r);
  ScopedWorkspace z(workspace, bytes);
  if (!z.get()) return "could not allocate a " + std::to_string(bytes) + "-byte workspace for z";
  Launch partial = MakeLaunch(first, CeilDiv(m, first.tiles[0]), CeilDiv(r, first.tiles[1]), 1,
                              {Ptr(x), Ptr(v), Ptr(s), Ptr(z.get())},
                              {int32_t(m), int32_t(blocks), int32_t(p), int32_t(r)}, "ppppiiii");
  Launch mix = BlockDiagLaunch(second, z.get(), u, bias, y, m, blocks, r, q);
  if (!(error = launcher.Run(partial)).empty()) return error;
  return launcher.Run(mix);
#else
  (void)stream, (void)u, (void)s, (void)v, (void)bias, (void)workspace;
  return "this library was built without cubins (run `make kernels` before building it)";
#endif
}

std::string CudaProbe() {
  std::string error;
  return LoadDriver(&error) ? "" : error;
}

}  // namespace ec

#include "library_info.h"

#include <string>

#include "onnxruntime_c_api.h"  // ORT_API_VERSION only

// ec_build_info.h is written next to the cubins by kernels/library.py at build time: the summary of the
// cubins compiled in (from manifest.json), so this file never parses the multi-megabyte ec_cubins.h.
#if __has_include("ec_build_info.h")
#include "ec_build_info.h"
#endif
#ifndef EC_BUILD_CUBINS_JSON
#define EC_BUILD_CUBINS_JSON "null"
#endif

namespace ec {

const char* LibraryInfoJson() {
  static const std::string json = std::string("{\"library\": \"edgecompress_ops\", \"version\": ") +
                                  std::to_string(EC_LIBRARY_VERSION) +
                                  ", \"ort_api_version\": " + std::to_string(ORT_API_VERSION) + ", \"domain\": \"" +
                                  kDomain + "\", \"domain_version\": " + std::to_string(kDomainVersion) +
                                  ", \"ops\": [\"LowRankMatMul\", \"MonarchMatMul\", \"BlastMatMul\"]"
                                  ", \"cpu_dtypes\": [\"float32\", \"float16\"]"
                                  ", \"cuda_dtypes\": [\"float32\", \"float16\", \"bfloat16\"]"
                                  ", \"cubins\": " EC_BUILD_CUBINS_JSON "}";
  return json.c_str();
}

}  // namespace ec

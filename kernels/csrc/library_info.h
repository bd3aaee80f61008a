// What the library is, for the Python loader (ec_library_info()): version, headers' API, domain, ops,
// and which cubins it was built with. Plain C++: safe to call before RegisterCustomOps.
#pragma once

// Bump when the ops' inputs, semantics or the exported entry points change (kernels/library.py checks it).
#define EC_LIBRARY_VERSION 1

namespace ec {

constexpr const char* kDomain = "ai.edgecompress";
constexpr int kDomainVersion = 1;

// A JSON object (static storage, NUL-terminated).
const char* LibraryInfoJson();

}  // namespace ec

#!/usr/bin/env bash
# The one home of the header fetch: the custom-op library (kernels/library.py) and examples/cpp use it.
# Fetch the ONNX Runtime C/C++ headers from Debian's libonnxruntime-dev (trixie, 1.21.0: the C API is
# versioned, and newer runtimes such as the 1.32 wheel serve older API versions). Nothing is vendored:
# the headers land in an ignored cache folder. Prints the include directory.
# Works on Debian bookworm or later with apt; reuses the mirror already configured for apt.
set -euo pipefail
# Default cache: .cache/ort at the top of the source checkout (kernels/..); kernels/library.py passes its own.
CACHE=${ORT_HEADERS_CACHE:-"$(cd "$(dirname "$0")/.." && pwd)/.cache/ort"}
INCLUDE="$CACHE/root/usr/include/onnxruntime"
if [ -f "$INCLUDE/onnxruntime_cxx_api.h" ]; then echo "$INCLUDE"; exit 0; fi
VERSION=1.21.0+dfsg-1
SHA256=${ORT_DEB_SHA256:-14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08}
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR=${MIRROR:-$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)}
[ -n "$MIRROR" ] || { echo "no Debian mirror configured for apt" >&2; exit 1; }
LISTS=$(mktemp -d); trap 'rm -rf "$LISTS"' EXIT
mkdir -p "$LISTS/lists/partial" "$CACHE"
echo "deb $MIRROR trixie main" > "$LISTS/sources.list"
APT=(-o "Dir::Etc::SourceList=$LISTS/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$LISTS/lists")
apt-get "${APT[@]}" update -qq >&2
(cd "$CACHE" && apt-get "${APT[@]}" download "libonnxruntime-dev=$VERSION" >&2 2>/dev/null)
DEB=$(ls "$CACHE"/libonnxruntime-dev_*.deb | head -1)
if [ -n "$SHA256" ]; then echo "$SHA256  $DEB" | sha256sum -c - >&2; fi
dpkg-deb -x "$DEB" "$CACHE/root"
echo "$INCLUDE"

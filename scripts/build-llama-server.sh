#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp tree vendored in the
# llama-cpp-python source distribution, offline (no curl, no OpenSSL, no
# prebuilt web UI download), and cache it per machine.
#
#   scripts/build-llama-server.sh            build if needed, print the binary path
#   scripts/build-llama-server.sh --path     print the cached path only if built (exit 1 if not)
#
# The binary is linked statically against ggml/llama (only libc, libstdc++,
# libgomp, libm stay dynamic) so it can be copied into a FROM-scratch image.
#
# Cache: ${AGENT_MACHINE_LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agent-machine/llama-server}/<version>-<key>/
#   bin/llama-server   the binary
#   stamp              written last; its presence means the build is complete
# A second run finds the stamp and does nothing. The key is a hash of the
# cmake flags and the CPU's feature flags (GGML_NATIVE tunes for this CPU).
#
# Inputs (environment):
#   LLAMA_CPP_PYTHON_VERSION   sdist version (default 0.3.36)
#   LLAMA_CPP_PYTHON_SDIST     path to an already downloaded sdist .tar.gz (skips pip download)
#   LLAMA_SERVER_CMAKE_ARGS    extra cmake flags (e.g. -DGGML_VULKAN=ON); part of the cache key
#   LLAMA_SERVER_JOBS          parallel compile jobs (default 2)
#
# The only network use is `pip download` of the sdist when it is not given
# and not already in the cache's src/ directory.
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${LLAMA_SERVER_JOBS:-2}
EXTRA_ARGS=${LLAMA_SERVER_CMAKE_ARGS:-}
CACHE_ROOT=${AGENT_MACHINE_LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agent-machine/llama-server}

CMAKE_ARGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DGGML_NATIVE=ON
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
)
# shellcheck disable=SC2206
[ -n "$EXTRA_ARGS" ] && CMAKE_ARGS+=($EXTRA_ARGS)

cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)
KEY=$(printf '%s\n' "${CMAKE_ARGS[@]}" "$cpu_flags" | sha256sum | cut -c1-12)
DIR="$CACHE_ROOT/$VERSION-$KEY"
BIN="$DIR/bin/llama-server"

log() { echo "build-llama-server: $*" >&2; }

if [ -f "$DIR/stamp" ] && [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
if [ "${1:-}" = "--path" ]; then
  log "not built yet (no $DIR/stamp)"
  exit 1
fi

for tool in cmake c++ tar; do
  command -v "$tool" >/dev/null || { log "missing '$tool' (install cmake and build-essential)"; exit 2; }
done

mkdir -p "$DIR"
# One build at a time per cache dir; a second caller waits, then finds the stamp.
exec 9>"$DIR/.lock"
flock 9
if [ -f "$DIR/stamp" ] && [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi

start=$(date +%s)
SDIST=${LLAMA_CPP_PYTHON_SDIST:-}
if [ -z "$SDIST" ]; then
  mkdir -p "$CACHE_ROOT/src"
  SDIST="$CACHE_ROOT/src/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$SDIST" ]; then
    log "downloading the llama-cpp-python $VERSION sdist"
    PYTHON=${PYTHON:-python3}
    tmpdl=$(mktemp -d "$CACHE_ROOT/src/.dl.XXXXXX")
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmpdl" >&2
    mv "$tmpdl/llama_cpp_python-$VERSION.tar.gz" "$SDIST"
    rmdir "$tmpdl"
  fi
fi
[ -f "$SDIST" ] || { log "sdist not found: $SDIST"; exit 2; }

WORK="$DIR/work"
rm -rf "$WORK"
mkdir -p "$WORK"
log "unpacking $(basename "$SDIST")"
tar xzf "$SDIST" -C "$WORK" --wildcards "*/vendor/llama.cpp/*"
SRC=$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)
[ -f "$SRC/CMakeLists.txt" ] || { log "no vendored llama.cpp in $SDIST"; exit 2; }

log "configuring (${CMAKE_ARGS[*]})"
cmake -S "$SRC" -B "$WORK/build" "${CMAKE_ARGS[@]}" >"$DIR/configure.log" 2>&1 \
  || { tail -30 "$DIR/configure.log" >&2; log "cmake configure failed; see $DIR/configure.log"; exit 1; }
log "compiling llama-server with $JOBS jobs (log: $DIR/build.log)"
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >"$DIR/build.log" 2>&1 \
  || { tail -30 "$DIR/build.log" >&2; log "build failed; see $DIR/build.log"; exit 1; }

mkdir -p "$DIR/bin"
install -m 0755 "$WORK/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
"$BIN" --version >"$DIR/version.txt" 2>&1 || true
rm -rf "$WORK"
elapsed=$(( $(date +%s) - start ))
printf 'llama-cpp-python %s\nkey %s\nbuilt %s\nseconds %s\n' "$VERSION" "$KEY" "$(date -u +%FT%TZ)" "$elapsed" >"$DIR/stamp.tmp"
sync "$DIR/stamp.tmp" 2>/dev/null || true
mv "$DIR/stamp.tmp" "$DIR/stamp"
log "built in ${elapsed}s"
echo "$BIN"

#!/usr/bin/env bash
# Idempotent set-up: Debian packages the tests and probe use, then the project
# with its dev extra. Safe to run again; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(mesa-vulkan-drivers vulkan-tools podman cmake build-essential)
PYTHON=${PYTHON:-python3}

missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

# llama-cpp-python compiles llama.cpp on first install (~6 min on 2 cores);
# pip's wheel cache serves later installs.
if ! "$PYTHON" -c "import nodeagent, llama_cpp, pytest, hypothesis" 2>/dev/null \
   || [ pyproject.toml -nt "$(${PYTHON} -c 'import nodeagent,os;print(os.path.dirname(nodeagent.__file__))' 2>/dev/null || echo /nonexistent)" ]; then
  echo "setup: pip install -e .[dev]"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PYTHON" -m pip install -q -e ".[dev]"
fi

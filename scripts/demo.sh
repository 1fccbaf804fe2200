#!/usr/bin/env bash
# The main job, end to end on this machine: probe, generate and import a model,
# serve the agent on its embedded default (llama-cpp-python), place two pods of
# one agent (the second lands where its context is cached), then verify every
# receipt offline with nothing but the public key.
#
# State goes to ${DEMO_DIR:-.demo} so the demo never touches a real install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

DEMO_DIR=$(realpath -m "${DEMO_DIR:-.demo}")
export AGENT_MACHINE_STATE_DIR="$DEMO_DIR/state" AGENT_MACHINE_CONFIG_DIR="$DEMO_DIR/config"
export AGENT_MACHINE_CACHE_DIR="$DEMO_DIR/cache" AGENT_MACHINE_RUNTIME_DIR="$DEMO_DIR/run"
export AGENT_MACHINE_CACHE_RAM_DIR="$DEMO_DIR/t1"
am() { python3 -m nodeagent.cli "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "probe: what this machine has"
am probe

step "a model: generate a small random-weight GGUF and import it"
if ! am models inspect tiny >/dev/null 2>&1; then
  am models create-test-model --preset tiny "$DEMO_DIR/tiny.gguf"
  am models import "$DEMO_DIR/tiny.gguf" --name tiny
fi
am models ls

step "serve: the agent on its Unix socket"
python3 -m nodeagent.cli serve > "$DEMO_DIR/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null || true; wait $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do am status >/dev/null 2>&1 && break; sleep 0.2; done
am status

step "pod 1: a support agent's first session (two turns)"
am pods submit examples/pod-support-agent.json --wait

step "pod 2: the same agent, a new session: where would it run, and why"
sed 's/"support-1"/"support-2"/; s/"ticket-42"/"ticket-43"/; s/reboots every night at 3am/drops Wi-Fi every hour/' \
  examples/pod-support-agent.json > "$DEMO_DIR/pod2.json"
am pods score "$DEMO_DIR/pod2.json"
am pods submit "$DEMO_DIR/pod2.json" --wait

step "cache and providers"
am cache stats
am ps

step "stop: SIGTERM drains the agent and signs a final checkpoint"
kill -TERM $SERVE_PID; wait $SERVE_PID || true; trap - EXIT
tail -n 3 "$DEMO_DIR/serve.log"

step "receipts: export, then verify offline with only the machine's public key"
am key show --format json | python3 -c 'import json,sys; sys.stdout.write(json.load(sys.stdin)["publicKeyPem"])' \
  > "$DEMO_DIR/machine.pub.pem"
rm -rf "$DEMO_DIR/export"
am receipts export "$DEMO_DIR/export"
am receipts verify "$DEMO_DIR/export" --key "$DEMO_DIR/machine.pub.pem"
echo
echo "demo: done. State is in $DEMO_DIR (delete it to start over)."

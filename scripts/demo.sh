#!/usr/bin/env bash
# The main job, end to end on this machine: probe, fetch and import a real
# instruct model (SmolLM2-135M-Instruct), serve the agent on its embedded
# default (llama-cpp-python), place two pods of one agent (the second lands
# where its context is cached), ask it through the OpenAI API with the answer
# streamed token by token, then verify every receipt offline with nothing but
# the public key.
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

step "a model: SmolLM2-135M-Instruct (real weights, its own chat template), fetched and verified"
if ! am models inspect smollm2 >/dev/null 2>&1; then
  am models import "$(bash scripts/fetch-smollm2.sh)" --name smollm2
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

step "the OpenAI API: a chat completion, streamed as the model writes it"
python3 - "$AGENT_MACHINE_RUNTIME_DIR/api.sock" <<'PY'
import json, sys, httpx
body = {"model": "smollm2", "stream": True, "temperature": 0, "max_tokens": 64,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France?"}]}
with httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1]), base_url="http://agent", timeout=120) as client:
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    print(choice["delta"].get("content") or "", end="", flush=True)
print()
PY

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

step "evidence: profile, storage receipts, activation decisions and the log, one signed bundle"
rm -rf "$DEMO_DIR/evidence"
am evidence bundle "$DEMO_DIR/evidence"
am evidence verify "$DEMO_DIR/evidence" --key "$DEMO_DIR/machine.pub.pem"
echo
echo "demo: done. State is in $DEMO_DIR (delete it to start over)."

#!/usr/bin/env bash
# Best effort: extract Podman's `quadlet` generator from Debian trixie's podman
# package (Debian 12's Podman 4.3 has none) into the per-machine cache, so the
# tests can dry-run rendered units through the real Quadlet. Nothing is
# installed system-wide. The mirror is the one this machine's apt already uses.
#
#   scripts/fetch-quadlet.sh     prints the binary path; exit 1 if it could not be had
set -euo pipefail

DEST=${XDG_CACHE_HOME:-$HOME/.cache}/agent-machine/quadlet
if found=$(ls "$DEST"/*/quadlet 2>/dev/null | head -1) && [ -x "$found" ]; then
  echo "$found"; exit 0
fi

mirror=$(grep -hoE '^URIs: *[^ ]+/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | sed 's/^URIs: *//')
[ -n "$mirror" ] || mirror=$(grep -hoE '^deb +[^ ]+/debian +' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')
[ -n "$mirror" ] || { echo "fetch-quadlet: no Debian mirror configured in apt" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
  "$mirror" > "$work/trixie.sources"
apt_opts=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$work" -o "Dir::State::Lists=$work/lists"
          -o "Dir::State::status=/dev/null" -o "Dir::Cache::archives=$work/archives" -o "Debug::NoLocking=1"
          -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" update -q >/dev/null
(cd "$work" && apt-get "${apt_opts[@]}" download podman >/dev/null)
deb=$(ls "$work"/podman_*.deb | head -1)
version=$(dpkg-deb -f "$deb" Version | sed 's/[+~-].*//')
dpkg-deb -x "$deb" "$work/x"
mkdir -p "$DEST/$version"
install -m 0755 "$work/x/usr/libexec/podman/quadlet" "$DEST/$version/quadlet"
echo "$DEST/$version/quadlet"

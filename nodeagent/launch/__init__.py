"""Launch modes that realize a `ProviderSpec`: subprocess (native), podman
(direct, no systemd) and quadlet (systemd units). See `nodeagent.launch.quadlet`
and `nodeagent.launch.podman` for what each renders."""

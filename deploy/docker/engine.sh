#!/usr/bin/env bash
# Makes sure a Docker engine answers: installs Debian's docker.io when dockerd is missing (as root), and
# starts dockerd when no engine runs, with host networking only (no bridge, no iptables: this machine's
# containers and builds use --network host). Prints `started` on stdout when it started the engine (the
# caller may stop it again: its pid is in $DOCKERD_PIDFILE), nothing otherwise.
set -euo pipefail

DOCKERD_PIDFILE=${DOCKERD_PIDFILE:-/var/run/pg-relay-dockerd.pid}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/pg-relay-dockerd.log}

if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "installing docker.io (Debian)" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    else
        echo "no Docker engine: install docker.io (Debian) or Docker Engine, then re-run" >&2
        exit 1
    fi
fi
[[ $(id -u) -eq 0 ]] || {
    echo "dockerd is installed but not running, and starting it needs root" >&2
    exit 1
}
echo "starting dockerd (--bridge=none --iptables=false; log $DOCKERD_LOG)" >&2
nohup dockerd --bridge=none --iptables=false --ip6tables=false --pidfile "$DOCKERD_PIDFILE" >"$DOCKERD_LOG" 2>&1 &
for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
        echo started
        exit 0
    fi
    sleep 0.5
done
echo "dockerd did not answer within 30 s; its log:" >&2
tail -n 30 "$DOCKERD_LOG" >&2
exit 1

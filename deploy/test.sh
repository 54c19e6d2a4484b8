#!/usr/bin/env bash
# The deployment checks of `scripts/test deploy` that need more than the offline file checks:
#
#   1. CloudFormation lint: cfn-lint and checkov (pinned in deploy/aws/requirements.txt, installed into
#      deploy/.venv when missing or changed) on deploy/aws/*.yaml; any finding fails (suppressions are
#      written next to their resource, with the reason).
#   2. The image proven: a Docker engine (installed and started when missing: deploy/docker/engine.sh), the
#      base images (deploy/docker/bases.sh: local stand-ins for the official ones when no registry is
#      reachable), `docker build` of the Dockerfile (the image that ships), then deploy/docker/smoke.py
#      runs its containers with host networking against a fresh database on the test PostgreSQL.
#
# Cleans up what it made: the smoke test's containers and database, the built image and its build
# stages, and the engine if it started it. Kept for the next run: the local base images and the cached
# Debian root file system (~/.cache/pg-relay; `docker rmi pg-relay-local/debian:bookworm
# pg-relay-local/rust:<version>-bookworm` and `rm -r ~/.cache/pg-relay` remove them).
#
#   deploy/test.sh            both
#   deploy/test.sh lint       only 1
#   deploy/test.sh image      only 2
#
# Environment: DATABASE_URL (the test PostgreSQL, default postgres://postgres@127.0.0.1:5432/postgres),
# PYTHON (a Python with the `websockets` package, default tests-sdk/.venv/bin/python), KEEP_IMAGE=1 keeps
# the built image (tagged pg-relay:test), BUILD_ARGS replaces the base-image build arguments (skipping
# deploy/docker/bases.sh; e.g. a builder image that already holds a target/ directory, for quick re-runs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
PYTHON=${PYTHON:-tests-sdk/.venv/bin/python}
WHAT=${1:-all}
START=$SECONDS
say() { printf '[deploy %3ds] %s\n' "$((SECONDS - START))" "$*"; }

lint() {
    local venv=deploy/.venv stamp=deploy/.venv/.installed
    if [[ ! -x $venv/bin/python ]]; then
        say "creating $venv"
        python3 -m venv "$venv"
    fi
    if [[ ! -f $stamp ]] || [[ "$(cat "$stamp")" != "$(sha256sum deploy/aws/requirements.txt)" ]]; then
        say "pip install -r deploy/aws/requirements.txt (cfn-lint, checkov)"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r deploy/aws/requirements.txt
        sha256sum deploy/aws/requirements.txt >"$stamp"
    fi
    say "cfn-lint $("$venv/bin/cfn-lint" --version | tail -n1) deploy/aws/*.yaml"
    "$venv/bin/cfn-lint" deploy/aws/*.yaml
    echo "PASS cfn-lint: no findings"
    say "checkov $("$venv/bin/checkov" --version) (cloudformation)"
    "$venv/bin/checkov" -d deploy/aws --framework cloudformation --skip-download --quiet --compact
    echo "PASS checkov: no failed checks (skips are written next to their resources)"
}

image() {
    local build_args status=0
    # Globals: the EXIT trap below runs after this function has returned.
    tag=pg-relay:test
    started=$(deploy/docker/engine.sh)
    dangling_before=$(docker images -q -f dangling=true | sort)
    containers_before=$(docker ps -aq --no-trunc | sort)
    build_pid=""
    cleanup() {
        if [[ -n $build_pid ]] && kill -0 "$build_pid" 2>/dev/null; then
            kill "$build_pid" 2>/dev/null || true
            wait "$build_pid" 2>/dev/null || true
        fi
        # Containers this run left (a cancelled build step's, the smoke test's if it was killed); the
        # daemon may still be tearing a cancelled step down, so try for up to 20 s.
        local new _
        for _ in $(seq 1 20); do
            new=$(comm -13 <(printf '%s\n' "$containers_before") <(docker ps -aq --no-trunc | sort))
            [[ -z $new ]] && break
            xargs -r docker rm -f <<<"$new" >/dev/null 2>&1 || true
            sleep 1
        done
        if [[ ${KEEP_IMAGE:-0} != 1 ]]; then
            docker rmi -f "$tag" >/dev/null 2>&1 || true
        fi
        # The builder stage's image and any other image this build left untagged.
        comm -13 <(printf '%s\n' "$dangling_before") <(docker images -q -f dangling=true | sort) |
            xargs -r docker rmi -f >/dev/null 2>&1 || true
        if [[ $started == started && -f /var/run/pg-relay-dockerd.pid ]]; then
            say "stopping the dockerd this script started"
            kill "$(cat /var/run/pg-relay-dockerd.pid)" 2>/dev/null || true
        fi
    }
    trap cleanup EXIT
    trap 'exit 143' TERM INT
    if [[ -n ${BUILD_ARGS:-} ]]; then
        build_args=$BUILD_ARGS
    else
        say "base images"
        build_args=$(deploy/docker/bases.sh)
    fi
    say "docker build $tag ($build_args)"
    local t0=$SECONDS
    # In the background, so that a TERM or INT reaches the trap at once (not after the build); the
    # trap's exit stops the build client, which cancels the build.
    # shellcheck disable=SC2086 # build_args is a list of --build-arg words
    docker build --network host --force-rm $build_args -t "$tag" . >/tmp/pg-relay-image-build.log 2>&1 &
    build_pid=$!
    if ! wait "$build_pid"; then
        tail -n 60 /tmp/pg-relay-image-build.log
        echo "FAIL docker build (log above)"
        return 1
    fi
    build_pid=""
    say "image built in $((SECONDS - t0)) s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
    "$PYTHON" deploy/docker/smoke.py "$tag" || status=$?
    return "$status"
}

case "$WHAT" in
    all)
        # Not `lint && image`: errexit does not apply inside a function called from an && list.
        lint
        image
        ;;
    lint) lint ;;
    image) image ;;
    *)
        echo "usage: deploy/test.sh [all|lint|image]" >&2
        exit 2
        ;;
esac
say "done"

#!/usr/bin/env bash
# Builds, on a machine without a container registry, the two base images the Dockerfile's build arguments
# name, and prints the build arguments that select them:
#
#   pg-relay-local/debian:bookworm       a Debian bookworm root file system (debootstrap --variant=minbase),
#                                        `docker import`ed: stands in for debian:bookworm-slim
#   pg-relay-local/rust:<version>        that root file system + gcc/libc6-dev + this machine's Rust
#                                        toolchain (the one rust-toolchain.toml selects, without its docs)
#                                        + this machine's extra CA certificates (/usr/local/share/
#                                        ca-certificates: a TLS-inspecting egress proxy), so that cargo in
#                                        the build reaches crates.io: stands in for rust:<version>-bookworm.
#                                        The runtime image gets none of this.
#
# The root file system tarball is cached in $PG_RELAY_CACHE (default ~/.cache/pg-relay; ~100 MB), so only
# the first run downloads Debian packages (~1-2 min). Both images are rebuilt when missing. With a
# registry none of this is needed: the Dockerfile's defaults are the official images.
#
# Output (stdout): `--build-arg RUST_IMAGE=... --build-arg RUNTIME_IMAGE=...`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
CACHE=${PG_RELAY_CACHE:-$HOME/.cache/pg-relay}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOTFS_TAR=$CACHE/debian-$SUITE-minbase.tar
say() { printf '[bases] %s\n' "$*" >&2; }

RUST_VERSION=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
[[ -n $RUST_VERSION ]] || {
    say "cannot read the channel of rust-toolchain.toml"
    exit 1
}
DEBIAN_IMAGE=pg-relay-local/debian:$SUITE
RUST_IMAGE=pg-relay-local/rust:$RUST_VERSION-$SUITE

if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    if [[ ! -s $ROOTFS_TAR ]]; then
        command -v debootstrap >/dev/null 2>&1 || {
            say "installing debootstrap"
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        }
        mkdir -p "$CACHE"
        work=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        say "debootstrap $SUITE (minbase) from $MIRROR"
        start=$SECONDS
        if ! debootstrap --variant=minbase "$SUITE" "$work/root" "$MIRROR" >"$work/log" 2>&1; then
            tail -n 30 "$work/log" >&2
            rm -rf "$work"
            exit 1
        fi
        # What debian:*-slim also drops: the package cache, lists, docs and man pages.
        rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"* \
            "$work/root/usr/share/doc/"* "$work/root/usr/share/man/"*
        tar -C "$work/root" --numeric-owner -cf "$ROOTFS_TAR.tmp" .
        mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
        rm -rf "$work"
        say "root file system cached in $ROOTFS_TAR ($((SECONDS - start)) s)"
    fi
    say "docker import $DEBIAN_IMAGE"
    docker import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$ROOTFS_TAR" "$DEBIAN_IMAGE" >/dev/null
fi

if ! docker image inspect "$RUST_IMAGE" >/dev/null 2>&1; then
    sysroot=$(rustc --print sysroot)
    [[ $(rustc --version) == "rustc $RUST_VERSION "* ]] || {
        say "rustc here is $(rustc --version), rust-toolchain.toml wants $RUST_VERSION"
        exit 1
    }
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx"' EXIT
    # Hard links where possible (same file system), a copy otherwise; no docs (share/ is ~800 MB).
    mkdir -p "$ctx/toolchain"
    for d in bin lib libexec etc; do
        [[ -e $sysroot/$d ]] && { cp -al "$sysroot/$d" "$ctx/toolchain/" 2>/dev/null || cp -a "$sysroot/$d" "$ctx/toolchain/"; }
    done
    mkdir -p "$ctx/extra-ca"
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$ctx/extra-ca/"
    fi
    cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $DEBIAN_IMAGE
COPY extra-ca/ /usr/local/share/ca-certificates/
RUN apt-get update \\
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
    && rm -rf /var/lib/apt/lists/* \\
    && update-ca-certificates
COPY toolchain/ /usr/local/rust/
ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    CARGO_HOME=/usr/local/cargo
DOCKERFILE
    say "docker build $RUST_IMAGE (toolchain from $sysroot)"
    start=$SECONDS
    docker build --network host -q -t "$RUST_IMAGE" "$ctx" >/dev/null
    say "$RUST_IMAGE built ($((SECONDS - start)) s)"
fi

echo "--build-arg RUST_IMAGE=$RUST_IMAGE --build-arg RUNTIME_IMAGE=$DEBIAN_IMAGE"

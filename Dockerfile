# syntax=docker/dockerfile:1
#
# One image with both binaries of the relay: `connector` (the default command) and `writer-lambda`.
#
#   docker build -t pg-relay .
#   docker run --rm -p 8000:8000 -e DATABASE_URL=postgres://… pg-relay                  # connector
#   docker run --rm -p 9000:9000 -e DATABASE_URL=postgres://… pg-relay writer-lambda    # local writer
#
# Stages: `chef` (the Rust toolchain and cargo-chef), `planner` (the dependency recipe of the workspace),
# `builder` (dependencies first, in their own cached layer, then the workspace), `runtime` (Debian slim,
# the two binaries, migrations/ and config.json, a non-root user). rust-toolchain.toml is deliberately
# not copied: the builder image's tag pins the toolchain, and rustup would otherwise fetch components.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS chef
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /build

FROM chef AS planner
COPY Cargo.toml Cargo.lock ./
COPY protocol/ protocol/
COPY connector/ connector/
COPY writer-lambda/ writer-lambda/
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# sqlx's macros must not look for a database while the image builds.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY --from=planner /build/recipe.json recipe.json
# This layer (all dependencies, compiled) is rebuilt only when Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY Cargo.toml Cargo.lock ./
COPY protocol/ protocol/
COPY connector/ connector/
COPY writer-lambda/ writer-lambda/
COPY migrations/ migrations/
RUN cargo build --release --locked --bin connector --bin writer-lambda

FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: TLS to RDS and to AWS Lambda; curl: the health checks of docker-compose.yml and ECS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --shell /usr/sbin/nologin relay
WORKDIR /app
COPY --from=builder /build/target/release/connector /build/target/release/writer-lambda /usr/local/bin/
COPY migrations/ /app/migrations/
COPY config.json /app/config.json
ENV RELAY_LISTEN=0.0.0.0:8000 \
    WRITER_LISTEN=0.0.0.0:9000 \
    RUST_LOG=info
USER 10001:10001
EXPOSE 8000 9000
CMD ["connector", "--config", "/app/config.json"]

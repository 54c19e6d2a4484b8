# One image with both binaries of the relay: `connector` (the default command) and `writer-lambda`. The
# same image is the ECS task (connector) and the writer Lambda function (container image, command
# `writer-lambda`: it runs under lambda_runtime when AWS_LAMBDA_RUNTIME_API is set).
#
#   docker build --network host -t pg-relay .
#   docker run --rm --network host -e DATABASE_URL=postgres://… pg-relay                 # connector, :8000
#
# Safe by default: a non-root user; the baked config is the production one (deploy/aws/config.json: the
# rule invokes the Lambda function `pg-relay-writer` through the AWS API, no local endpoint); only the
# connector's port is exposed; the writer's local invoke server (outside Lambda) binds 127.0.0.1 and needs
# WRITER_SECRET unless told otherwise (see writer-lambda/README.md); logs are JSON lines.
#
# The bases are build arguments: the official images by default; scripts/test (deploy/docker/bases.sh)
# passes images it builds locally from a debootstrap root file system when no registry is reachable.
# rust-toolchain.toml is deliberately not copied: the builder image pins the toolchain, and rustup would
# otherwise try to download components.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /build
# sqlx's macros must not look for a database while the image builds.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols
COPY Cargo.toml Cargo.lock ./
COPY protocol/ protocol/
COPY connector/ connector/
COPY writer-lambda/ writer-lambda/
# A workspace member (the benchmark): cargo reads every member's manifest; it is not built here.
COPY bench/ bench/
COPY migrations/ migrations/
# Only what ships: the two binaries, release profile.
RUN cargo build --release --locked --bin connector --bin writer-lambda

FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: TLS to RDS, AWS Lambda and Secrets Manager; curl: the container health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --shell /usr/sbin/nologin relay
WORKDIR /app
COPY --from=builder /build/target/release/connector /build/target/release/writer-lambda /usr/local/bin/
# The migrations are compiled into the connector; the baked config is the AWS one.
COPY deploy/aws/config.json /app/config.json
ENV RELAY_CONFIG=/app/config.json \
    RELAY_LOG_FORMAT=json \
    RUST_LOG=info
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/readyz"]
CMD ["connector"]

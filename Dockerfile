# syntax=docker/dockerfile:1
#
# Image for both binaries: the worker `catchall` (the entrypoint) and `catchall-producer`.
#   docker build -t catchall .
#   docker build -t registry.example.com/catchall:1.0 .   # for Kubernetes: a new version tag per
#                                                         # build (deploy/kubernetes/kustomization.yaml)
#   docker run --rm catchall --help
#   docker run --rm --entrypoint catchall-producer catchall --help

# --- build -------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# The whole context (see .dockerignore): the workspace manifests and lock file, src/, producer/,
# and migrations/, which refinery's embed_migrations! compiles into the binary.
COPY . .

# The cache mounts keep the crates.io downloads and the target directory between builds, so a
# source change recompiles only our crates. The target directory is a cache and not part of the
# image, so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p catchall -p catchall-producer \
    && mkdir -p /out \
    && cp target/release/catchall target/release/catchall-producer /out/

# --- run ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates is not pinned (DL3008): the current root certificates of the release are wanted,
# and bookworm's archive drops superseded versions, so a pin would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 catchall \
    && useradd --system --uid 10001 --gid catchall --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin catchall

COPY --from=builder /out/catchall /out/catchall-producer /usr/local/bin/

# Numeric, so that runtimes enforcing "run as non-root" can verify it without /etc/passwd.
USER 10001:10001

# The worker's default 127.0.0.1:8080 is unreachable from outside a container.
ENV HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080

# The worker probes itself (no curl in the image): GET /healthz on ADMIN_ADDR when it is set,
# else on HTTP_ADDR; exit 0 or 1. Kubernetes ignores HEALTHCHECK and probes /healthz and
# /readyz/lookups itself, on ADMIN_ADDR (deploy/kubernetes).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["catchall", "healthcheck", "--path", "/healthz", "--timeout", "3s"]

# Exec form: the worker is PID 1 and receives SIGTERM itself, then drains and exits 0 (SPEC §4).
ENTRYPOINT ["catchall"]

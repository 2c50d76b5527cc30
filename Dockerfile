# syntax=docker/dockerfile:1
# modelcache: one image holding both binaries, modelcache-agent and modelcache-csi; the Helm chart
# picks the program with `command`. Build from the repository's root:
#   docker build -t ghcr.io/modelcache/modelcache:dev .
# (hack/kind-e2e.sh builds it and loads it into a kind cluster.)

# Build: protoc comes from crates.io (protoc-bin-vendored), so cargo is all the build needs.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin modelcache-agent --bin modelcache-csi \
 && install -D -m 0755 target/release/modelcache-agent target/release/modelcache-csi -t /out

# Run: glibc, libgcc and CA certificates (for the hub's TLS), nothing else: no shell, no package
# manager. Same Debian release as the build stage, so the glibc matches. Runs as root: the agent
# owns the node's store (a hostPath) and the CSI plugin mounts.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/ /usr/local/bin/
LABEL org.opencontainers.image.source="https://github.com/modelcache/modelcache" \
      org.opencontainers.image.description="modelcache: Hugging Face models as read-only Kubernetes volumes" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/modelcache-agent"]
CMD ["--help"]

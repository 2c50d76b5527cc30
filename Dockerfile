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

# mke2fs, which formats cache volumes' images, with the libraries it links (glibc aside: the
# runtime image has it), from the same Debian release.
FROM docker.io/library/debian:bookworm-slim AS mke2fs
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs \
 && mkdir -p /out/usr/sbin /out/etc \
 && cp /usr/sbin/mke2fs /out/usr/sbin/ \
 && cp /etc/mke2fs.conf /out/etc/ \
 && ldd /usr/sbin/mke2fs | awk '/=> \// {print $3}' | grep -v -e '/libc\.so' -e '/ld-linux' \
    | xargs -I{} cp --parents {} /out

# Run: glibc, libgcc, CA certificates (for the hub's TLS) and mke2fs, nothing else: no shell, no
# package manager. Same Debian release as the build stage, so the glibc matches. Runs as root:
# the agent owns the node's store (a hostPath) and the CSI plugin mounts.
FROM gcr.io/distroless/cc-debian12
COPY --from=mke2fs /out/ /
COPY --from=build /out/ /usr/local/bin/
LABEL org.opencontainers.image.source="https://github.com/modelcache/modelcache" \
      org.opencontainers.image.description="modelcache: Hugging Face models as read-only Kubernetes volumes" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/modelcache-agent"]
CMD ["--help"]

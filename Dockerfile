# syntax=docker/dockerfile:1
#
# svcproxy node image: the binary plus the kernel tools it runs.
#   docker build -t svcproxy:0.1.0 .
# (manifests/daemonset.yaml refers to svcproxy:0.1.0; retag for your registry.)

FROM rust:1-slim-bookworm AS builder
WORKDIR /src
# The whole tree (minus .dockerignore): Cargo.toml names the bench target, so it must exist.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin svcproxy \
    && install -m 0755 target/release/svcproxy /svcproxy

FROM debian:bookworm-slim
# iptables: both iptables-nft and iptables-legacy (svcproxy follows whichever the node uses);
# nftables: `nft`, for the nftables mode and for cleaning up other modes' tables at start-up;
# conntrack and iproute2: the tools an admin reaches for when debugging from the pod.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables conntrack iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /svcproxy /usr/local/bin/svcproxy
ENTRYPOINT ["/usr/local/bin/svcproxy"]

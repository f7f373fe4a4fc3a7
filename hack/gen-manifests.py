#!/usr/bin/env python3
"""Generate N Services x E endpoints as svcproxy manifests (deterministic).

Usage: hack/gen-manifests.py -n 2000 -e 5 -o DIR [--nodes 3] [--per-file 1000]

* every Service is ClusterIP with one TCP port; every 10th one (i % 10 == 9) is NodePort;
* one discovery.k8s.io/v1 EndpointSlice per Service with E ready endpoints,
  spread round-robin over nodes node-0 .. node-(nodes-1);
* a Node object for node-0 (the node the rules are rendered for).

Output is multi-document YAML split over several files so that huge N stays readable.
The same arguments always produce byte-identical files.
"""
import argparse
import ipaddress
import os
import sys

SVC_BASE = int(ipaddress.IPv4Address("10.96.0.0"))
POD_BASE = int(ipaddress.IPv4Address("10.128.0.0"))  # inside --cluster-cidr 10.128.0.0/9


def ip(n: int) -> str:
    return str(ipaddress.IPv4Address(n))


def service(i: int, nodes: int, eps: int) -> str:
    name = f"svc-{i:05d}"
    ns = f"ns-{i % 50:02d}"
    cluster_ip = ip(SVC_BASE + 16 + i)  # 10.96.0.16 .. (10k fits in 10.96.0.0/12)
    nodeport = i % 10 == 9
    port = 80 + (i % 3)  # a little variety: 80, 81, 82
    target = 8080
    lines = [
        "apiVersion: v1",
        "kind: Service",
        f"metadata: {{namespace: {ns}, name: {name}}}",
        "spec:",
        f"  type: {'NodePort' if nodeport else 'ClusterIP'}",
        f"  clusterIP: {cluster_ip}",
        f"  clusterIPs: [{cluster_ip}]",
        "  ports:",
    ]
    if nodeport:
        np = 30000 + (i // 10) % 2768
        lines.append(
            f"    - {{name: http, port: {port}, targetPort: {target}, nodePort: {np}, protocol: TCP}}"
        )
    else:
        lines.append(f"    - {{name: http, port: {port}, targetPort: {target}, protocol: TCP}}")
    lines += [
        "---",
        "apiVersion: discovery.k8s.io/v1",
        "kind: EndpointSlice",
        "metadata:",
        f"  namespace: {ns}",
        f"  name: {name}-s1",
        f"  labels: {{kubernetes.io/service-name: {name}}}",
        "addressType: IPv4",
        "ports:",
        f"  - {{name: http, port: {target}, protocol: TCP}}",
        "endpoints:",
    ]
    for j in range(eps):
        k = i * eps + j
        node = k % nodes
        # node n owns 10.128.0.0/9 slice 10.(128+n*16).0.0/12: unique per endpoint
        addr = ip(POD_BASE + (node << 20) + 2 + k // nodes)
        lines += [
            f"  - addresses: [{addr}]",
            f"    nodeName: node-{node}",
            "    conditions: {ready: true}",
        ]
    return "\n".join(lines) + "\n"


def node0() -> str:
    return "\n".join([
        "apiVersion: v1",
        "kind: Node",
        "metadata: {name: node-0}",
        "spec:",
        '  podCIDRs: ["10.128.0.0/12"]',
        "status:",
        "  addresses:",
        "    - {type: InternalIP, address: 192.168.0.10}",
        "    - {type: Hostname, address: node-0}",
    ]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--services", type=int, required=True)
    ap.add_argument("-e", "--endpoints", type=int, default=5)
    ap.add_argument("-o", "--out", required=True, help="output directory (created; old gen-*.yaml removed)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--per-file", type=int, default=500, help="services per file (default 500; any size works, smaller files reload faster on edits)")
    a = ap.parse_args()
    if a.services < 0 or a.endpoints < 0 or a.nodes < 1 or a.per_file < 1:
        ap.error("counts must be positive")
    if a.services * a.endpoints // a.nodes + 2 >= 1 << 20:
        ap.error("too many endpoints for the pod address plan")

    os.makedirs(a.out, exist_ok=True)
    for f in os.listdir(a.out):
        if f.startswith("gen-") and f.endswith(".yaml"):
            os.remove(os.path.join(a.out, f))
    with open(os.path.join(a.out, "gen-node.yaml"), "w") as fh:
        fh.write(node0())
    for start in range(0, a.services, a.per_file):
        end = min(a.services, start + a.per_file)
        with open(os.path.join(a.out, f"gen-svc-{start:06d}.yaml"), "w") as fh:
            fh.write("---\n".join(service(i, a.nodes, a.endpoints) for i in range(start, end)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

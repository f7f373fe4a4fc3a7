#!/usr/bin/env python3
"""Reshape one `iptables-restore --noflush` batch (svcproxy's render output) into the
sequence of restore inputs a given strategy would feed to iptables-nft-restore.

Usage: hack/noflush-shape.py STRATEGY OUTDIR < render.txt
       hack/noflush-shape.py --canon < iptables-save-output   (normalise for comparison)

Writes OUTDIR/000.rules, OUTDIR/001.rules, ... to be applied in order, each with
`iptables-nft-restore --noflush`. Every strategy keeps --noflush semantics: it never
flushes a table or a chain the input does not name.

Strategies
  asis            the render unchanged (one restore)
  split-tables    one restore per table (filter, then nat)
  dashN           ':CHAIN - [0:0]' of user chains replaced by '-N CHAIN' (only valid when
                  none of the chains exists yet)
  decl-first[-desc|-asc][-N]
                  restore 1 declares every user chain (':' lines, or '-N' with -N), in
                  render order or sorted descending/ascending; restore 2 is the render as is
  allchains       per table, first ':BUILTIN - [0:0]' for each built-in chain the batch
                  writes to, then '-S' (a read-only, chain-less command: it makes
                  iptables-nft fetch the whole table once instead of building its per-chain
                  cache request list, which is quadratic), then the render's lines
  chunk:K         bottom-up chunks: user chains topologically sorted (jump targets first),
                  K chains per restore with their declarations and rules; writes to
                  built-in chains and -X deletions go in the table's last restore
  partial:M       M services' KUBE-SVC chains and their KUBE-SEP chains (M=1 with 5
                  endpoints: 6 chains), declarations + rules, as a partial sync writes them
  partial:M-allchains  the same with the allchains prelude
  rules-only      only the rules of the render (for a table whose chains already exist)
  rules-only-allchains, rules-only-nojump (jumps to user chains rewritten to -j RETURN),
  decls-only, decls-only-desc   (breakdown helpers)
"""
import os
import re
import sys

BUILTIN = {
    "filter": ["INPUT", "FORWARD", "OUTPUT"],
    "nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
    "mangle": ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
    "raw": ["PREROUTING", "OUTPUT"],
    "security": ["INPUT", "FORWARD", "OUTPUT"],
}
JUMP = re.compile(r"\s-[jg]\s+(\S+)")


class Table:
    def __init__(self, name):
        self.name = name
        self.decls = []  # (chain, line) for user chains, render order
        self.builtin_decls = []  # lines ':INPUT ...'
        self.rules = []  # (chain, line, kind) kind in A, I, X, other


def parse(text):
    tables = []
    cur = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = Table(line[1:].strip())
            tables.append(cur)
        elif line == "COMMIT":
            cur = None
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain in BUILTIN.get(cur.name, []):
                cur.builtin_decls.append(line)
            else:
                cur.decls.append((chain, line))
        else:
            parts = line.split()
            kind = parts[0].lstrip("-")
            chain = parts[1] if len(parts) > 1 else None
            cur.rules.append((chain, line, kind))
    return tables


def block(tname, lines):
    return ["*" + tname] + lines + ["COMMIT"]


def write(outdir, batches):
    os.makedirs(outdir, exist_ok=True)
    for f in os.listdir(outdir):
        if f.endswith(".rules"):
            os.remove(os.path.join(outdir, f))
    for i, b in enumerate(batches):
        with open(os.path.join(outdir, f"{i:03d}.rules"), "w") as fh:
            fh.write("\n".join(b) + "\n")


def full_lines(t):
    return t.builtin_decls + [l for _, l in t.decls] + [l for _, l, _ in t.rules]


def allchains_prelude(t):
    builtins = BUILTIN.get(t.name, [])
    written = []
    for chain, _, kind in t.rules:
        if chain in builtins and kind in ("A", "I") and chain not in written:
            written.append(chain)
    # ':BUILTIN - [0:0]' keeps an existing chain's policy and rules and creates a missing
    # one; it must precede '-S', which otherwise registers *fake* built-in chains in the
    # cache and a later '-I INPUT 1' on a table without INPUT fails with ENOENT.
    return [f":{c} - [0:0]" for c in written] + ["-S"]


def topo(t):
    user = [c for c, _ in t.decls]
    known = set(user)
    deps = {c: [] for c in user}
    for chain, line, kind in t.rules:
        if chain in deps:
            for m in JUMP.finditer(" " + line):
                tgt = m.group(1)
                if tgt in known and tgt != chain and tgt not in deps[chain]:
                    deps[chain].append(tgt)
    order, state = [], {}
    for root in user:
        if root in state:
            continue
        stack = [(root, iter(deps[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    return order


def chunked(tables, k):
    batches = []
    for t in tables:
        order = topo(t)
        decl = dict(t.decls)
        by_chain = {}
        tail = []
        for chain, line, kind in t.rules:
            if chain in decl and kind in ("A", "I"):
                by_chain.setdefault(chain, []).append(line)
            else:
                tail.append(line)  # built-in chain writes, -X, anything else: last
        groups = [order[i:i + k] for i in range(0, len(order), k)] or [[]]
        for gi, g in enumerate(groups):
            lines = (t.builtin_decls if gi == 0 else []) + [decl[c] for c in g]
            for c in g:
                lines += by_chain.get(c, [])
            if gi == len(groups) - 1:
                lines += tail
            batches.append(block(t.name, lines))
    return batches


def partial(tables, m):
    nat = next(t for t in tables if t.name == "nat")
    decl = dict(nat.decls)
    svcs = [c for c, _ in nat.decls if c.startswith("KUBE-SVC-")][:m]
    chains = []
    for svc in svcs:
        chains.append(svc)
        for chain, line, _ in nat.rules:
            if chain == svc:
                for mt in JUMP.finditer(" " + line):
                    if mt.group(1).startswith("KUBE-SEP-") and mt.group(1) not in chains:
                        chains.append(mt.group(1))
    wanted = set(chains)
    lines = [decl[c] for c in chains] + [l for c, l, _ in nat.rules if c in wanted]
    return lines


def canon(text):
    """iptables-save output -> canonical text: counters and comments dropped, chains
    sorted by name, each chain's rules kept in order."""
    out = []
    for t in parse(text):
        out.append("*" + t.name)
        for line in sorted(t.builtin_decls):
            out.append(re.sub(r"\s*\[\d+:\d+\]$", "", line))
        for _, line in sorted(t.decls):
            out.append(re.sub(r"\s*\[\d+:\d+\]$", "", line))
        groups = {}
        for chain, line, _ in t.rules:
            groups.setdefault(chain or "", []).append(re.sub(r"^\[\d+:\d+\]\s*", "", line))
        for chain in sorted(groups):
            out.extend(groups[chain])
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) == 2 and sys.argv[1] == "--canon":
        sys.stdout.write(canon(sys.stdin.read()))
        return 0
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    strat, outdir = sys.argv[1], sys.argv[2]
    tables = parse(sys.stdin.read())
    if strat == "asis":
        batches = [sum((block(t.name, full_lines(t)) for t in tables), [])]
    elif strat == "split-tables":
        batches = [block(t.name, full_lines(t)) for t in tables]
    elif strat == "dashN":
        batches = [sum((block(t.name, t.builtin_decls + [f"-N {c}" for c, _ in t.decls]
                              + [l for _, l, _ in t.rules]) for t in tables), [])]
    elif strat.startswith("decl-first"):
        opts = strat.split("-")[2:]
        first = []
        for t in tables:
            names = [c for c, _ in t.decls]
            if "desc" in opts:
                names.sort(reverse=True)
            elif "asc" in opts:
                names.sort()
            lines = [f"-N {c}" if "N" in opts else f":{c} - [0:0]" for c in names]
            first += block(t.name, lines)
        batches = [first, sum((block(t.name, full_lines(t)) for t in tables), [])]
    elif strat == "allchains":
        batches = [sum((block(t.name, allchains_prelude(t) + full_lines(t)) for t in tables), [])]
    elif strat.startswith("chunk:"):
        batches = chunked(tables, int(strat.split(":")[1]))
    elif strat.startswith("partial:"):
        spec = strat.split(":")[1]
        lines = partial(tables, int(spec.split("-")[0]))
        if spec.endswith("-allchains"):
            lines = ["-S"] + lines
        batches = [block("nat", lines)]
    elif strat.startswith("rules-only"):
        out = []
        for t in tables:
            known = {c for c, _ in t.decls}
            lines = []
            for _, line, _ in t.rules:
                if strat.endswith("-nojump"):
                    line = JUMP.sub(lambda m: " -j RETURN" if m.group(1) in known
                                    else m.group(0), line)
                lines.append(line)
            pre = allchains_prelude(t) if strat.endswith("-allchains") else []
            out += block(t.name, pre + lines)
        batches = [out]
    elif strat.startswith("decls-only"):
        out = []
        for t in tables:
            names = [c for c, _ in t.decls]
            if strat.endswith("-desc"):
                names.sort(reverse=True)
            out += block(t.name, [f":{c} - [0:0]" for c in names])
        batches = [out]
    else:
        print(f"unknown strategy {strat}", file=sys.stderr)
        return 2
    write(outdir, batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())

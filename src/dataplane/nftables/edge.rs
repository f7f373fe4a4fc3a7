//! The nftables kernel edge: the only code that runs `nft`.
//!
//! The trait is deliberately narrow (apply one transaction, list table names, list one
//! table, check the canary) so that a netlink implementation can replace [`ProcessEdge`]
//! without touching the renderer, the differ or the backend.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::diff::{RULE_CHECKED_CHAINS, TableState};
use super::{
    CLUSTER_IPS, FIREWALL_IPS, NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES, NODEPORT_IPS,
    SERVICE_IPS, SERVICE_NODEPORTS, TABLE, ip_kw,
};
use crate::dataplane::BackendError;
use crate::model::IpFamily;

/// The set whose presence is the canary: static, always there, small.
pub const CANARY_SET: &str = NODEPORT_IPS;

/// Sets and maps whose elements svcproxy writes (and the resync compares).
pub const MANAGED_SETS: &[&str] = &[
    SERVICE_IPS,
    SERVICE_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    NO_ENDPOINT_NODEPORTS,
    FIREWALL_IPS,
    CLUSTER_IPS,
    NODEPORT_IPS,
];

/// Hands all pieces of a transaction, in order, to the function it is given.
pub type Produce<'a> = dyn FnMut(&mut dyn FnMut(&str)) + 'a;

/// The kernel operations the nftables backend needs.
pub trait NftEdge: Send {
    /// Applies one transaction atomically: all of it or, on error, none of it.
    fn apply(&mut self, transaction: &str) -> Result<(), BackendError>;

    /// Applies one transaction that `produce` hands over in pieces (a rewrite is tens of
    /// MiB at 10k services; an implementation may stream it instead of holding it).
    /// Returns the bytes sent. Same all-or-nothing guarantee as [`NftEdge::apply`].
    fn apply_streamed(&mut self, produce: &mut Produce<'_>) -> Result<usize, BackendError> {
        let mut text = String::new();
        produce(&mut |piece| text.push_str(piece));
        self.apply(&text).map(|()| text.len())
    }

    /// `(family, name)` of every nftables table in the namespace.
    fn tables(&mut self) -> Result<Vec<(String, String)>, BackendError>;

    /// svcproxy's table of `family` in comparable form (`None` when it does not exist).
    /// Expensive at scale: only for start-up and the periodic resync.
    fn list_table(&mut self, family: IpFamily) -> Result<Option<TableState>, BackendError>;

    /// Cheap check that svcproxy's table of `family` is still there (its `nodeport-ips`
    /// set exists). It sees `nft flush ruleset` and deleted tables; a `flush table` that
    /// only empties chains is found by the periodic resync instead.
    fn canary(&mut self, family: IpFamily) -> Result<bool, BackendError>;
}

/// Runs the `nft` binary.
#[derive(Clone, Debug, Default)]
pub struct ProcessEdge;

fn run(args: &[&str], stdin: Option<&str>) -> Result<Output, BackendError> {
    let spawn_err = |source| BackendError::Spawn {
        tool: "nft".into(),
        source,
    };
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        // nft reads everything before it applies: a write error shows up in its status.
        let _ = pipe.write_all(input.as_bytes());
    }
    child.wait_with_output().map_err(spawn_err)
}

fn tool_error(args: &[&str], out: &Output) -> BackendError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A failing transaction can print one error per bad line: keep the first few.
    let stderr: Vec<&str> = stderr.trim().lines().take(12).collect();
    BackendError::Tool {
        tool: format!("nft {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: stderr.join("\n"),
    }
}

impl NftEdge for ProcessEdge {
    fn apply(&mut self, transaction: &str) -> Result<(), BackendError> {
        let args = ["-f", "-"];
        let out = run(&args, Some(transaction))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(tool_error(&args, &out))
        }
    }

    fn apply_streamed(&mut self, produce: &mut Produce<'_>) -> Result<usize, BackendError> {
        let args = ["-f", "-"];
        let spawn_err = |source| BackendError::Spawn {
            tool: "nft".into(),
            source,
        };
        let mut child = Command::new("nft")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let mut pipe =
            std::io::BufWriter::with_capacity(1 << 20, child.stdin.take().expect("piped stdin"));
        let mut sent = 0usize;
        let mut broken = false;
        produce(&mut |piece| {
            sent += piece.len();
            // nft stops reading when it fails to parse: its status says why.
            broken = broken || pipe.write_all(piece.as_bytes()).is_err();
        });
        let _ = pipe.flush();
        drop(pipe);
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            Ok(sent)
        } else {
            Err(tool_error(&args, &out))
        }
    }

    fn tables(&mut self) -> Result<Vec<(String, String)>, BackendError> {
        let args = ["list", "tables"];
        let out = run(&args, None)?;
        if !out.status.success() {
            return Err(tool_error(&args, &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("table")).then_some(())?;
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect())
    }

    fn list_table(&mut self, family: IpFamily) -> Result<Option<TableState>, BackendError> {
        // Not `nft -j list table`: with rules it is 112 MB of JSON and ~1 min at 10k
        // services x 10 endpoints. Chain names, set names and the managed sets' elements
        // are a few seconds and enough to see drift.
        let fam = ip_kw(family);
        let mut st = TableState::default();
        list_into(&mut st, &["-j", "list", "chains", fam])?;
        list_into(&mut st, &["-j", "-t", "list", "sets", fam])?;
        list_into(&mut st, &["-j", "-t", "list", "maps", fam])?;
        if st.chains.is_empty() && st.sets.is_empty() {
            return Ok(None);
        }
        for chain in RULE_CHECKED_CHAINS {
            if st.chains.contains(*chain) {
                list_into(&mut st, &["-j", "list", "chain", fam, TABLE, chain])?;
            }
        }
        let managed: Vec<String> = st
            .sets
            .iter()
            .filter(|s| MANAGED_SETS.contains(&s.as_str()))
            .cloned()
            .collect();
        for name in managed {
            let kind = if name == CLUSTER_IPS || name == NODEPORT_IPS {
                "set"
            } else {
                "map"
            };
            list_into(&mut st, &["-j", "list", kind, fam, TABLE, &name])?;
        }
        Ok(Some(st))
    }

    fn canary(&mut self, family: IpFamily) -> Result<bool, BackendError> {
        // `list set` makes nft fetch only the table's sets and this set's (few) elements;
        // `list chain` or `list tables` would dump every chain (~1 s at 100k chains).
        let args = ["list", "set", ip_kw(family), TABLE, CANARY_SET];
        let out = run(&args, None)?;
        // A missing table or set is a non-zero exit: the canary is gone.
        Ok(out.status.success())
    }
}

/// Runs `nft ARGS` and adds its JSON output to `st`, parsed as it is read: the chain
/// listing alone is 15 MB at 10k services and is never held whole.
fn list_into(st: &mut TableState, args: &[&str]) -> Result<(), BackendError> {
    let spawn_err = |source| BackendError::Spawn {
        tool: "nft".into(),
        source,
    };
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let stdout = child.stdout.take().expect("piped stdout");
    let parsed = parse_into(st, std::io::BufReader::with_capacity(1 << 16, stdout));
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(tool_error(args, &out));
    }
    parsed.map_err(|e| BackendError::Tool {
        tool: format!("nft {}", args.join(" ")),
        status: "unparsable output".into(),
        stderr: e.to_string(),
    })
}

/// nft syntax of one JSON key or key part.
fn key_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            if let Some(Value::Array(parts)) = o.get("concat") {
                parts.iter().map(key_text).collect::<Vec<_>>().join(" . ")
            } else if let Some(inner) = o.get("elem").and_then(|e| e.get("val")) {
                key_text(inner)
            } else if let Some(Value::Object(p)) = o.get("prefix") {
                format!(
                    "{}/{}",
                    p.get("addr").map(key_text).unwrap_or_default(),
                    p.get("len").map(key_text).unwrap_or_default()
                )
            } else {
                v.to_string()
            }
        }
        other => other.to_string(),
    }
}

/// nft syntax of one JSON verdict (`goto chain`, `drop`).
fn verdict_text(v: &Value) -> String {
    match v {
        Value::Object(o) => match o.iter().next() {
            Some((verdict, Value::Object(t))) => match t.get("target") {
                Some(Value::String(target)) => format!("{verdict} {target}"),
                _ => verdict.clone(),
            },
            Some((verdict, _)) => verdict.clone(),
            None => String::new(),
        },
        other => key_text(other),
    }
}

/// Reads `nft -j list …` output of svcproxy's table into comparable form.
pub fn parse_listing(json: &[u8]) -> Result<TableState, serde_json::Error> {
    let mut st = TableState::default();
    parse_into(&mut st, json)?;
    Ok(st)
}

/// Deserializes `{"nftables": [entry, …]}` handing each entry to [`add_entry`] as soon as
/// it is parsed, so no list of entries is built.
struct ListingVisitor<'a>(&'a mut TableState);

impl<'de> serde::de::Visitor<'de> for ListingVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an nft JSON listing")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "nftables" {
                map.next_value_seed(EntriesSeed(&mut *self.0))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct EntriesSeed<'a>(&'a mut TableState);

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of nft objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<Entry>()? {
            add_entry(self.0, entry);
        }
        Ok(())
    }
}

/// One object of a listing; everything but chains, sets and maps is skipped. Typed, so a
/// 100k-chain listing is not held as a JSON tree.
#[derive(serde::Deserialize)]
struct Entry {
    rule: Option<RuleOf>,
    chain: Option<Named>,
    set: Option<Named>,
    map: Option<Named>,
}

#[derive(serde::Deserialize)]
struct Named {
    name: String,
    table: String,
    #[serde(default)]
    elem: Vec<Value>,
}

#[derive(serde::Deserialize)]
struct RuleOf {
    chain: String,
    table: String,
}

/// Adds the chains, sets and managed elements of svcproxy's table in `json` to `st`
/// (objects of other tables are skipped; rules are not compared).
fn parse_into(st: &mut TableState, json: impl std::io::Read) -> Result<(), serde_json::Error> {
    use serde::Deserializer as _;
    serde_json::Deserializer::from_reader(json).deserialize_map(ListingVisitor(st))
}

/// Adds one listed object of svcproxy's table to `st`.
fn add_entry(st: &mut TableState, entry: Entry) {
    if let Some(r) = entry.rule.filter(|r| r.table == TABLE) {
        if RULE_CHECKED_CHAINS.contains(&r.chain.as_str()) {
            *st.rule_counts.entry(r.chain).or_insert(0) += 1;
        }
        return;
    }
    if let Some(c) = entry.chain.filter(|c| c.table == TABLE) {
        if RULE_CHECKED_CHAINS.contains(&c.name.as_str()) {
            st.rule_counts.entry(c.name.clone()).or_insert(0);
        }
        st.chains.insert(c.name);
        return;
    }
    let (is_map, s) = match (entry.set, entry.map) {
        (Some(s), _) => (false, s),
        (None, Some(m)) => (true, m),
        (None, None) => return,
    };
    if s.table != TABLE {
        return;
    }
    if MANAGED_SETS.contains(&s.name.as_str()) {
        for e in &s.elem {
            let (key, value) = match (is_map, e) {
                (true, Value::Array(kv)) if kv.len() == 2 => {
                    (key_text(&kv[0]), Some(verdict_text(&kv[1])))
                }
                _ => (key_text(e), None),
            };
            st.elements.insert((s.name.clone(), key, value));
        }
    }
    st.sets.insert(s.name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_is_read_into_nft_syntax() {
        let json = r#"{"nftables":[{"metainfo":{}},{"table":{"family":"ip","name":"svcproxy"}},
            {"set":{"table":"svcproxy","name":"cluster-ips","type":"ipv4_addr","elem":["10.96.0.10"]}},
            {"set":{"table":"svcproxy","name":"affinity-X","type":"ipv4_addr","elem":[{"elem":{"val":"10.0.0.9","timeout":10800}}]}},
            {"map":{"table":"svcproxy","name":"service-ips","map":"verdict","elem":[[{"concat":["10.96.0.10","tcp",80]},{"goto":{"target":"service-A-ns/web/tcp/http"}}],[{"concat":["10.96.0.11","udp",53]},{"drop":null}]]}},
            {"chain":{"table":"svcproxy","name":"services"}},{"chain":{"table":"svcproxy","name":"empty"}},
            {"chain":{"table":"nat","name":"PREROUTING"}},
            {"rule":{"table":"svcproxy","chain":"services","expr":[]}},{"rule":{"table":"svcproxy","chain":"services","expr":[]}}]}"#;
        let st = parse_listing(json.as_bytes()).unwrap();
        let chains: Vec<&str> = st.chains.iter().map(String::as_str).collect();
        assert_eq!(
            chains,
            ["empty", "services"],
            "other tables' chains skipped"
        );
        assert_eq!(st.rule_counts.get("services"), Some(&2));
        assert!(st.sets.contains("affinity-X") && st.sets.contains("service-ips"));
        let elems: Vec<_> = st.elements.iter().cloned().collect();
        assert_eq!(
            elems,
            vec![
                ("cluster-ips".into(), "10.96.0.10".into(), None),
                (
                    "service-ips".into(),
                    "10.96.0.10 . tcp . 80".into(),
                    Some("goto service-A-ns/web/tcp/http".into())
                ),
                (
                    "service-ips".into(),
                    "10.96.0.11 . udp . 53".into(),
                    Some("drop".into())
                ),
            ]
        );
    }
}

//! Chain names shared with upstream kube-proxy.
//!
//! Upstream names per-service chains `PREFIX` + the first 16 characters of
//! base32(sha256(servicePortName + protocol [+ endpoint])). Keeping the exact scheme lets
//! svcproxy adopt (and clean) the chains of a node taken over from kube-proxy, and keeps
//! `iptables -t nat -L` reading the way admins know.

use sha2::{Digest, Sha256};

use crate::model::ServicePortName;

/// Cluster-policy chain prefix.
pub const SVC_PREFIX: &str = "KUBE-SVC-";
/// Local-policy chain prefix.
pub const SVL_PREFIX: &str = "KUBE-SVL-";
/// External-destination chain prefix.
pub const EXT_PREFIX: &str = "KUBE-EXT-";
/// loadBalancerSourceRanges firewall chain prefix.
pub const FW_PREFIX: &str = "KUBE-FW-";
/// Per-endpoint chain prefix.
pub const SEP_PREFIX: &str = "KUBE-SEP-";
/// Chain prefixes of removed upstream versions, still cleaned up.
pub const LEGACY_PREFIXES: &[&str] = &["KUBE-XLB-"];

/// Whether a chain is a per-service or per-endpoint chain (ours or upstream's), i.e. one
/// that may be deleted when no service needs it any more.
pub fn is_service_chain(name: &str) -> bool {
    [SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX]
        .iter()
        .chain(LEGACY_PREFIXES)
        .any(|p| name.starts_with(p))
}

fn hash16(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    // 16 base32 characters encode exactly the first 10 bytes (80 bits), so encoding only
    // those gives the same prefix as upstream's truncated full encoding.
    data_encoding::BASE32.encode(&digest[..10])
}

/// The 16-character hash of a service port, shared by its SVC/SVL/EXT/FW chains.
pub fn port_hash(spn: &ServicePortName) -> String {
    hash16(&[&spn.to_string(), spn.protocol.as_str()])
}

/// `KUBE-SEP-…` chain of one endpoint of a service port; `endpoint` is the endpoint's
/// `ip:port` text ([`crate::model::Endpoint::addr_string`]).
pub fn endpoint_chain(spn_text: &str, protocol: &str, endpoint: &str) -> String {
    let mut name = String::with_capacity(25);
    name.push_str(SEP_PREFIX);
    name.push_str(&hash16(&[spn_text, protocol, endpoint]));
    name
}

/// Longest readable part of an nftables chain or set name (the kernel allows 255 bytes;
/// upstream kube-proxy keeps room for its prefixes the same way).
const NFT_BASE_MAX: usize = 200;

/// Base of an nftables object name, as upstream kube-proxy's nftables mode builds it: 8
/// characters of base32(sha256(text)), a dash, then `text` (e.g. `ns/name/tcp/http`),
/// truncated with `...` when too long. The hash keeps truncated names unique and makes
/// names that differ in one digit easy to tell apart; the text keeps them readable.
pub fn nft_base(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    // 8 base32 characters encode exactly the first 5 bytes.
    let mut name = data_encoding::BASE32.encode(&digest[..5]);
    name.push('-');
    name.push_str(text);
    if name.len() > NFT_BASE_MAX {
        let mut cut = NFT_BASE_MAX - 3;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name.push_str("...");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol, ServiceName};

    fn spn(port: &str) -> ServicePortName {
        ServicePortName {
            service: ServiceName::new("ns1", "svc1"),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn names_match_upstream() {
        assert_eq!(
            format!("{SVC_PREFIX}{}", port_hash(&spn("p80"))),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        let ep = Endpoint::ready_at("10.180.0.1".parse().unwrap(), 80);
        assert_eq!(
            endpoint_chain("ns1/svc1:p80", "tcp", &ep.addr_string()),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    #[test]
    fn nft_names_match_upstream() {
        // upstream: servicePortChainNameBase("ns1/svc1", "tcp", "p80")
        assert_eq!(nft_base("ns1/svc1/tcp/p80"), "ULMVA6XW-ns1/svc1/tcp/p80");
        let long = "n".repeat(300);
        let b = nft_base(&long);
        assert_eq!(b.len(), NFT_BASE_MAX);
        assert!(b.ends_with("..."));
    }

    #[test]
    fn service_chain_prefixes() {
        assert!(is_service_chain("KUBE-SVC-XPGD46QRK7WJZT7O"));
        assert!(is_service_chain("KUBE-XLB-AAAA"));
        assert!(!is_service_chain("KUBE-SERVICES"));
        assert!(!is_service_chain("KUBE-MARK-MASQ"));
    }
}

//! Making service IPs local to the node: /32 (/128) addresses on a dedicated dummy interface
//! where the kernel supports one, else on `lo`.
//!
//! Every address svcproxy adds carries the address protocol [`ADDRESS_PROTO`] (`IFA_PROTO`,
//! recent iproute2 shows `proto 0x53`), so reconciliation and `--cleanup` find exactly
//! svcproxy's addresses and never touch an admin's. The kernel edge is the small
//! [`AddressEdge`] trait; [`FakeAddresses`] implements it in memory for unit tests.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_core::ErrorMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
};

use super::UserspaceError;

/// `IFA_PROTO` value marking svcproxy's addresses ('S'); kernel-assigned values are 0-3.
pub const ADDRESS_PROTO: u8 = 0x53;

/// The dummy interface created for service addresses where the kernel supports it.
pub const DUMMY_INTERFACE: &str = "svcproxy0";

/// `lo`'s interface index is fixed by the kernel (`LOOPBACK_IFINDEX`).
const LOOPBACK_INDEX: u32 = 1;

/// Where svcproxy's service addresses live, as the kernel does it.
pub trait AddressEdge: Send {
    /// The addresses carrying svcproxy's mark, on any interface.
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, UserspaceError>;
    /// Adds `ip` as a /32 (/128), marked. Adding an address that exists is not an error.
    fn add(&mut self, ip: IpAddr) -> Result<(), UserspaceError>;
    /// Removes svcproxy's `ip`. Removing an address that is gone is not an error.
    fn remove(&mut self, ip: IpAddr) -> Result<(), UserspaceError>;
    /// Adds several addresses (an edge may overlap the requests); one result per address.
    fn add_many(&mut self, ips: &[IpAddr]) -> Vec<Result<(), UserspaceError>> {
        ips.iter().map(|ip| self.add(*ip)).collect()
    }
}

/// What one reconciliation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressChanges {
    /// Addresses added.
    pub added: usize,
    /// Addresses removed.
    pub removed: usize,
}

/// Makes the marked addresses exactly `desired`: adds the missing ones, removes the others.
/// Every change is attempted; the first error is returned after the rest were tried, so one
/// bad address does not block the others.
pub fn reconcile(
    edge: &mut dyn AddressEdge,
    desired: &BTreeSet<IpAddr>,
) -> Result<AddressChanges, UserspaceError> {
    let present = edge.list()?;
    apply(edge, &present, desired)
}

/// Applies the change from `previous` to `desired` without listing the kernel (partial
/// syncs: the previous sync left exactly `previous`). Same error handling as [`reconcile`].
pub fn apply(
    edge: &mut dyn AddressEdge,
    previous: &BTreeSet<IpAddr>,
    desired: &BTreeSet<IpAddr>,
) -> Result<AddressChanges, UserspaceError> {
    let mut changes = AddressChanges::default();
    let mut first_error = None;
    let missing: Vec<IpAddr> = desired.difference(previous).copied().collect();
    for result in edge.add_many(&missing) {
        match result {
            Ok(()) => changes.added += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for ip in previous.difference(desired) {
        match edge.remove(*ip) {
            Ok(()) => changes.removed += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(changes),
    }
}

/// An in-memory [`AddressEdge`] for tests; `fail_on` makes adds of one address fail.
#[derive(Debug, Default)]
pub struct FakeAddresses {
    /// The marked addresses "in the kernel".
    pub addresses: BTreeSet<IpAddr>,
    /// Adding this address fails.
    pub fail_on: Option<IpAddr>,
    /// Number of add/remove calls made.
    pub calls: usize,
}

impl AddressEdge for FakeAddresses {
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, UserspaceError> {
        Ok(self.addresses.clone())
    }

    fn add(&mut self, ip: IpAddr) -> Result<(), UserspaceError> {
        self.calls += 1;
        if self.fail_on == Some(ip) {
            return Err(UserspaceError::Netlink {
                op: "add address",
                detail: format!("{ip}: injected failure"),
            });
        }
        self.addresses.insert(ip);
        Ok(())
    }

    fn remove(&mut self, ip: IpAddr) -> Result<(), UserspaceError> {
        self.calls += 1;
        self.addresses.remove(&ip);
        Ok(())
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(ErrorMessage { code, .. }) => code.map(|c| -c.get()),
        _ => None,
    }
}

fn netlink(op: &'static str, what: impl std::fmt::Display, e: rtnetlink::Error) -> UserspaceError {
    UserspaceError::Netlink {
        op,
        detail: format!("{what}: {e}"),
    }
}

/// The real kernel edge: rtnetlink on the network namespace of the calling process.
pub struct NetlinkAddresses {
    runtime: tokio::runtime::Handle,
    handle: rtnetlink::Handle,
    /// Interface index addresses are added to.
    index: u32,
    /// Where each known marked address lives (from the last listing and from adds), so a
    /// removal needs no dump: removing many addresses stays linear.
    known: std::collections::HashMap<IpAddr, u32>,
}

impl NetlinkAddresses {
    /// Opens a netlink connection driven by `runtime` (which must not be the caller's own
    /// runtime: calls block on it) and picks the interface: the dummy [`DUMMY_INTERFACE`]
    /// (created if missing) when the kernel supports dummy links, else `lo`.
    pub fn open(runtime: tokio::runtime::Handle, use_dummy: bool) -> Result<Self, UserspaceError> {
        let (conn, handle, _) = {
            let _guard = runtime.enter();
            rtnetlink::new_connection().map_err(UserspaceError::Socket)?
        };
        runtime.spawn(conn);
        let mut edge = Self {
            runtime,
            handle,
            index: LOOPBACK_INDEX,
            known: std::collections::HashMap::new(),
        };
        if use_dummy {
            match edge.dummy_index(true) {
                Ok(Some(i)) => edge.index = i,
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(error = %e, "no dummy interface support; service addresses go on lo");
                }
            }
        }
        tracing::debug!(
            interface = if edge.index == LOOPBACK_INDEX {
                "lo"
            } else {
                DUMMY_INTERFACE
            },
            "service addresses interface"
        );
        Ok(edge)
    }

    /// The index of [`DUMMY_INTERFACE`], creating it (up) when `create` is set.
    fn dummy_index(&mut self, create: bool) -> Result<Option<u32>, UserspaceError> {
        let handle = self.handle.clone();
        self.runtime.block_on(async move {
            let found = handle
                .link()
                .get()
                .match_name(DUMMY_INTERFACE.to_string())
                .execute()
                .try_next()
                .await;
            match found {
                Ok(Some(link)) => return Ok(Some(link.header.index)),
                Ok(None) => {}
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::ENODEV as i32) => {}
                Err(e) => return Err(netlink("get link", DUMMY_INTERFACE, e)),
            }
            if !create {
                return Ok(None);
            }
            handle
                .link()
                .add(rtnetlink::LinkDummy::new(DUMMY_INTERFACE).up().build())
                .execute()
                .await
                .map_err(|e| netlink("create dummy link", DUMMY_INTERFACE, e))?;
            let link = handle
                .link()
                .get()
                .match_name(DUMMY_INTERFACE.to_string())
                .execute()
                .try_next()
                .await
                .map_err(|e| netlink("get link", DUMMY_INTERFACE, e))?;
            Ok(link.map(|l| l.header.index))
        })
    }

    /// Deletes [`DUMMY_INTERFACE`] if it exists (cleanup).
    pub fn delete_dummy(&mut self) -> Result<bool, UserspaceError> {
        let Some(index) = self.dummy_index(false)? else {
            return Ok(false);
        };
        let handle = self.handle.clone();
        self.runtime.block_on(async move {
            handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(|e| netlink("delete link", DUMMY_INTERFACE, e))
        })?;
        Ok(true)
    }

    /// svcproxy's address messages (any interface), as the kernel reports them.
    fn marked(&mut self) -> Result<Vec<AddressMessage>, UserspaceError> {
        let handle = self.handle.clone();
        self.runtime.block_on(async move {
            let mut out = Vec::new();
            let mut dump = handle.address().get().execute();
            while let Some(msg) = dump
                .try_next()
                .await
                .map_err(|e| netlink("list addresses", "all", e))?
            {
                if msg.attributes.iter().any(
                    |a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == ADDRESS_PROTO),
                ) {
                    out.push(msg);
                }
            }
            Ok(out)
        })
    }
}

fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the local address for IPv4; IPv6 only has IFA_ADDRESS.
    msg.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
}

impl AddressEdge for NetlinkAddresses {
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, UserspaceError> {
        let msgs = self.marked()?;
        self.known = msgs
            .iter()
            .filter_map(|m| address_of(m).map(|ip| (ip, m.header.index)))
            .collect();
        Ok(self.known.keys().copied().collect())
    }

    fn add(&mut self, ip: IpAddr) -> Result<(), UserspaceError> {
        self.add_many(&[ip]).pop().unwrap_or(Ok(()))
    }

    fn add_many(&mut self, ips: &[IpAddr]) -> Vec<Result<(), UserspaceError>> {
        use futures::StreamExt;
        let requests: Vec<_> = ips.iter().map(|ip| (*ip, self.add_request(*ip))).collect();
        // Up to 256 requests in flight: one round trip to the kernel per address would make
        // the first sync of a big cluster wait on thread hand-offs, not on the kernel.
        let outcomes: Vec<(IpAddr, Result<(), rtnetlink::Error>)> = self.runtime.block_on(
            futures::stream::iter(requests)
                .map(|(ip, req)| async move { (ip, req.execute().await) })
                .buffer_unordered(256)
                .collect(),
        );
        let mut by_ip: std::collections::HashMap<IpAddr, Result<(), UserspaceError>> =
            std::collections::HashMap::new();
        for (ip, outcome) in outcomes {
            let result = match outcome {
                Ok(()) => {
                    self.known.insert(ip, self.index);
                    Ok(())
                }
                // Already there (maybe not ours: then it stays unknown and is never removed).
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::EEXIST as i32) => Ok(()),
                Err(e) => Err(netlink("add address", ip, e)),
            };
            by_ip.insert(ip, result);
        }
        ips.iter()
            .map(|ip| by_ip.remove(ip).unwrap_or(Ok(())))
            .collect()
    }

    fn remove(&mut self, ip: IpAddr) -> Result<(), UserspaceError> {
        let msgs = match self.known.remove(&ip) {
            // The same message an add would send names the address to delete.
            Some(index) => {
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                let mut req = self.handle.address().add(index, ip, prefix);
                vec![req.message_mut().clone()]
            }
            None => self
                .marked()?
                .into_iter()
                .filter(|m| address_of(m) == Some(ip))
                .collect(),
        };
        for msg in msgs {
            match self
                .runtime
                .block_on(self.handle.address().del(msg).execute())
            {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::EADDRNOTAVAIL as i32) => {}
                Err(e) => return Err(netlink("delete address", ip, e)),
            }
        }
        Ok(())
    }
}

impl NetlinkAddresses {
    /// The request that adds `ip` to the service interface, marked.
    fn add_request(&self, ip: IpAddr) -> rtnetlink::AddressAddRequest {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let mut req = self.handle.address().add(self.index, ip, prefix);
        let msg = req.message_mut();
        msg.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(
                ADDRESS_PROTO,
            )));
        if ip.is_ipv6() {
            // No duplicate address detection: the address must be usable (bindable) at once.
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req
    }

    /// Removes every marked address in one dump (instead of one dump per address).
    pub fn remove_all(&mut self) -> Result<usize, UserspaceError> {
        let msgs = self.marked()?;
        let n = msgs.len();
        for msg in msgs {
            let ip = address_of(&msg);
            match self
                .runtime
                .block_on(self.handle.address().del(msg).execute())
            {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(nix::errno::Errno::EADDRNOTAVAIL as i32) => {}
                Err(e) => return Err(netlink("delete address", format!("{ip:?}"), e)),
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn reconcile_adds_missing_and_removes_extra() {
        let mut fake = FakeAddresses {
            addresses: set(&["10.96.0.1", "10.96.0.2"]),
            ..FakeAddresses::default()
        };
        let desired = set(&["10.96.0.2", "10.96.0.3", "fd00::10"]);
        let c = reconcile(&mut fake, &desired).unwrap();
        assert_eq!(
            c,
            AddressChanges {
                added: 2,
                removed: 1
            }
        );
        assert_eq!(fake.addresses, desired);
        // Converged: nothing to do.
        let calls = fake.calls;
        assert_eq!(
            reconcile(&mut fake, &desired).unwrap(),
            AddressChanges::default()
        );
        assert_eq!(fake.calls, calls);
    }

    #[test]
    fn apply_changes_only_the_difference_without_listing() {
        let mut fake = FakeAddresses {
            // 10.96.0.9 is marked in the kernel but unknown to the previous sync: a partial
            // sync leaves it to the next full one.
            addresses: set(&["10.96.0.1", "10.96.0.2", "10.96.0.9"]),
            ..FakeAddresses::default()
        };
        let c = apply(
            &mut fake,
            &set(&["10.96.0.1", "10.96.0.2"]),
            &set(&["10.96.0.2", "10.96.0.3"]),
        )
        .unwrap();
        assert_eq!(
            c,
            AddressChanges {
                added: 1,
                removed: 1
            }
        );
        assert_eq!(
            fake.addresses,
            set(&["10.96.0.2", "10.96.0.3", "10.96.0.9"])
        );
        assert_eq!(fake.calls, 2);
    }

    #[test]
    fn one_failure_does_not_block_the_others() {
        let mut fake = FakeAddresses {
            addresses: set(&["10.96.0.9"]),
            fail_on: Some("10.96.0.2".parse().unwrap()),
            ..FakeAddresses::default()
        };
        let desired = set(&["10.96.0.1", "10.96.0.2", "10.96.0.3"]);
        assert!(reconcile(&mut fake, &desired).is_err());
        assert_eq!(fake.addresses, set(&["10.96.0.1", "10.96.0.3"]));
    }
}

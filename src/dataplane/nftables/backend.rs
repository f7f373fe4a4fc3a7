//! The nftables backend: one atomic `nft` transaction per sync, carrying only the delta
//! from what was last committed (the [`Mirror`]) after the first.
//!
//! The kernel is read only on the periodic full sync, which lists svcproxy's tables to
//! verify the mirror and counts any drift (then rewrites the tables; without drift it sends
//! only what differs from the snapshot). A rewrite (first sync, after a failure or a flush)
//! needs no listing: it replaces svcproxy's tables and removes upstream kube-proxy's in one
//! transaction with `add table` + `delete table`. A failed transaction changes nothing; the
//! mirror is dropped, and the tables are rewritten at once (a failed delta) or at the next
//! sync (a failed rewrite). `SyncStats::kernel_time` covers `nft` and, for a rewrite, the
//! text streamed into it.

use std::time::Instant;

use super::diff::{Delta, Mirror};
use super::edge::{NftEdge, ProcessEdge};
use super::{TABLE, UPSTREAM_TABLE, ip_kw};
use crate::dataplane::iptables::backend::ConfigFn;
use crate::dataplane::{Backend, BackendError, SyncStats};
use crate::model::{Changes, IpFamily, Snapshot};

/// What one family contributes to a sync's transaction.
enum Plan {
    /// Replace the table with this one.
    Replace(Mirror),
    /// Apply a delta; on success replace the mirror with `Some` or commit the delta.
    Delta(Delta, Option<Mirror>),
}

/// nftables mode for one or two families.
pub struct NftablesBackend<E: NftEdge> {
    edge: E,
    config: ConfigFn,
    families: Vec<IpFamily>,
    /// What each family's table holds, as of the last successful transaction; `None` when
    /// unknown (start-up, after a failure or a flush): the next sync rewrites the table.
    mirrors: Vec<Option<Mirror>>,
    drift_total: u64,
}

impl<E: NftEdge> NftablesBackend<E> {
    /// A backend serving `families`, with settings from `config`.
    pub fn new(edge: E, families: &[IpFamily], config: ConfigFn) -> Self {
        Self {
            edge,
            config,
            families: families.to_vec(),
            mirrors: families.iter().map(|_| None).collect(),
            drift_total: 0,
        }
    }

    /// The kernel edge (tests inspect the fake through it).
    pub fn edge(&self) -> &E {
        &self.edge
    }

    /// Mutable access to the kernel edge (tests tamper with the fake through it).
    pub fn edge_mut(&mut self) -> &mut E {
        &mut self.edge
    }

    /// Objects found drifted from the mirror over all resyncs since start (for a metric).
    pub fn drift_total(&self) -> u64 {
        self.drift_total
    }

    /// Removes upstream kube-proxy's tables of every served family, whether or not they
    /// exist (`add` then `delete`): listing the tables would cost a dump of every chain.
    fn upstream_removal(&self) -> String {
        let mut out = String::new();
        for family in &self.families {
            let fam = ip_kw(*family);
            out.push_str(&format!(
                "add table {fam} {UPSTREAM_TABLE}\ndelete table {fam} {UPSTREAM_TABLE}\n"
            ));
        }
        out
    }

    fn plan_family(
        &mut self,
        idx: usize,
        snap: &Snapshot,
        changes: &Changes,
        full: bool,
        stats: &mut SyncStats,
    ) -> Result<Plan, BackendError> {
        let family = self.families[idx];
        let cfg = (self.config)(family, &snap.node);
        let Some(mirror) = &self.mirrors[idx] else {
            return Ok(Plan::Replace(Mirror::render(&cfg, snap)));
        };
        let settings_changed = mirror.config() != &cfg || mirror.node() != &snap.node;
        if !full && !settings_changed && !changes.node_changed {
            let delta = mirror.plan_services(snap, &changes.services);
            return Ok(if delta.needs_full {
                Plan::Replace(Mirror::render(&cfg, snap))
            } else {
                Plan::Delta(delta, None)
            });
        }
        if full {
            // Periodic resync: verify the mirror against the kernel.
            let drifted = match self.edge.list_table(family) {
                Ok(Some(actual)) => mirror.drift_from(&actual),
                Ok(None) => mirror.drift_from(&Default::default()),
                Err(e) => {
                    // Unverifiable is not a reason to stop syncing: rewrite instead.
                    tracing::warn!(family = ip_kw(family), error = %e, "cannot list the nftables table; rewriting it");
                    return Ok(Plan::Replace(Mirror::render(&cfg, snap)));
                }
            };
            if drifted > 0 {
                tracing::warn!(
                    family = ip_kw(family),
                    drifted,
                    "nftables table differs from what svcproxy committed; rewriting it"
                );
                stats.drift += drifted;
                self.drift_total += drifted as u64;
                return Ok(Plan::Replace(Mirror::render(&cfg, snap)));
            }
        }
        if !settings_changed {
            // Resync of an unchanged configuration: only the ports that differ are held.
            let delta = mirror.plan_everything(snap);
            return Ok(if delta.needs_full {
                Plan::Replace(Mirror::render(&cfg, snap))
            } else {
                Plan::Delta(delta, None)
            });
        }
        let desired = Mirror::render(&cfg, snap);
        if !mirror.same_statics(&desired) {
            return Ok(Plan::Replace(desired));
        }
        let delta = mirror.plan_all(&desired);
        Ok(if delta.needs_full {
            Plan::Replace(desired)
        } else {
            Plan::Delta(delta, Some(desired))
        })
    }

    fn sync_once(
        &mut self,
        snap: &Snapshot,
        changes: &Changes,
        full: bool,
        stats: &mut SyncStats,
    ) -> Result<bool, BackendError> {
        let mut plans = Vec::with_capacity(self.families.len());
        for idx in 0..self.families.len() {
            plans.push(self.plan_family(idx, snap, changes, full, stats)?);
        }
        let any_replace = plans.iter().any(|p| matches!(p, Plan::Replace(_)));
        let prelude = if any_replace {
            self.upstream_removal()
        } else {
            String::new()
        };
        let mut all_full = true;
        let mut empty = prelude.is_empty();
        for plan in &plans {
            match plan {
                Plan::Replace(m) => {
                    empty = false;
                    stats.objects_written += m.chain_count();
                }
                Plan::Delta(d, _) => {
                    all_full = false;
                    empty &= d.is_empty();
                    stats.objects_written += d.chains_written;
                    stats.objects_deleted += d.chains_deleted;
                }
            }
        }
        stats.full = all_full || full;
        if !empty {
            let families = &self.families;
            let mut produce = |emit: &mut dyn FnMut(&str)| {
                emit(&prelude);
                for (idx, plan) in plans.iter().enumerate() {
                    let fam = ip_kw(families[idx]);
                    match plan {
                        Plan::Replace(m) => {
                            // `add` first so that `delete` works whether or not the table
                            // exists.
                            emit(&format!(
                                "add table {fam} {TABLE}\ndelete table {fam} {TABLE}\n"
                            ));
                            m.write_full_chunked(emit);
                        }
                        Plan::Delta(d, _) => emit(&d.text),
                    }
                }
            };
            let started = Instant::now();
            let result = self.edge.apply_streamed(&mut produce);
            stats.kernel_time += started.elapsed();
            match result {
                Ok(bytes) => stats.bytes += bytes,
                Err(e) => {
                    self.mirrors.iter_mut().for_each(|m| *m = None);
                    return Err(e);
                }
            }
        }
        for (idx, plan) in plans.into_iter().enumerate() {
            match plan {
                Plan::Replace(m) | Plan::Delta(_, Some(m)) => self.mirrors[idx] = Some(m),
                Plan::Delta(d, None) => {
                    if let Some(m) = self.mirrors[idx].as_mut() {
                        m.commit(d);
                    }
                }
            }
        }
        Ok(any_replace)
    }
}

impl<E: NftEdge> Backend for NftablesBackend<E> {
    fn sync(
        &mut self,
        snap: &Snapshot,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncStats, BackendError> {
        let mut stats = SyncStats::default();
        let had_mirrors = self.mirrors.iter().all(Option::is_some);
        match self.sync_once(snap, changes, full, &mut stats) {
            Ok(_) => {}
            Err(e) if had_mirrors => {
                // The delta changed nothing; rewrite the tables from scratch right away.
                tracing::warn!(error = %e, "nftables delta failed; rewriting the tables");
                stats.partial_fell_back = true;
                self.sync_once(snap, changes, true, &mut stats)?;
            }
            Err(e) => return Err(e),
        }
        for m in self.mirrors.iter().flatten() {
            let (i, e) = m.no_local_counts();
            stats.no_local_internal += i;
            stats.no_local_external += e;
        }
        Ok(stats)
    }

    fn rules_intact(&mut self) -> bool {
        let mut intact = true;
        for idx in 0..self.families.len() {
            if self.mirrors[idx].is_none() {
                continue; // nothing installed yet, or already due for a rewrite
            }
            let family = self.families[idx];
            match self.edge.canary(family) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        family = ip_kw(family),
                        "nftables canary is gone: the table was flushed or deleted; rewriting it"
                    );
                    self.mirrors[idx] = None;
                    intact = false;
                }
                Err(e) => {
                    tracing::warn!(family = ip_kw(family), error = %e, "cannot check the nftables canary");
                }
            }
        }
        intact
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        self.mirrors.iter_mut().for_each(|m| *m = None);
        remove_tables(&mut self.edge)
    }

    fn name(&self) -> &'static str {
        "nftables"
    }
}

/// Deletes svcproxy's and upstream kube-proxy's nftables tables (both families) in one
/// transaction, and checks that none is left.
pub fn remove_tables(edge: &mut dyn NftEdge) -> Result<(), BackendError> {
    let owned = |(f, n): &(String, String)| {
        (f == "ip" || f == "ip6") && (n == TABLE || n == UPSTREAM_TABLE)
    };
    let present: Vec<(String, String)> = edge.tables()?.into_iter().filter(owned).collect();
    if present.is_empty() {
        return Ok(());
    }
    let text: String = present
        .iter()
        .map(|(f, n)| format!("delete table {f} {n}\n"))
        .collect();
    edge.apply(&text)?;
    let left: Vec<String> = edge
        .tables()?
        .into_iter()
        .filter(owned)
        .map(|(f, n)| format!("{f} {n}"))
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(BackendError::Leftovers(format!(
            "nft tables {}",
            left.join(", ")
        )))
    }
}

/// The daemon's nftables backend. Switching from iptables mode: svcproxy's and upstream
/// kube-proxy's iptables chains are removed first (both variants; legacy only when its
/// tables exist, since reading them would create them), so no stale KUBE-SERVICES keeps
/// catching traffic. Failures are logged: they must not keep the proxy from starting.
pub fn start(families: &[IpFamily], config: ConfigFn) -> NftablesBackend<ProcessEdge> {
    use crate::dataplane::iptables::{cleanup, edge as ipt};
    for variant in [ipt::Variant::Nft, ipt::Variant::Legacy] {
        if variant == ipt::Variant::Legacy && !ipt::Variant::legacy_in_use() {
            continue;
        }
        let mut edge = ipt::ProcessEdge::new(variant);
        for family in families {
            match cleanup::remove_rules(&mut edge, *family) {
                Ok(()) | Err(BackendError::Spawn { .. }) => {}
                Err(e) => {
                    tracing::warn!(?variant, ?family, error = %e, "cannot remove iptables-mode leftovers")
                }
            }
        }
    }
    NftablesBackend::new(ProcessEdge, families, config)
}

/// Called by iptables mode at start-up: removes svcproxy's and upstream kube-proxy's
/// nftables tables, whose base chains would otherwise still DNAT service traffic.
pub fn remove_leftovers_of_nftables_mode() {
    match remove_tables(&mut ProcessEdge) {
        Ok(()) | Err(BackendError::Spawn { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "cannot remove nftables-mode leftovers"),
    }
}

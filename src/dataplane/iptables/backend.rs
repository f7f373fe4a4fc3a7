//! The iptables backend: renders, applies with one `iptables-restore --noflush` per family
//! per sync, and keeps a mirror of the per-service chains in the kernel.
//!
//! The kernel is read (`iptables-save`) only when the mirror is unknown: at start-up (to adopt
//! what upstream kube-proxy or an earlier run left, without flushing first), after a failed
//! restore, and after the canary shows the tables were flushed. Every other sync works from
//! the mirror. A failed partial restore is followed at once by a full one.

use std::collections::BTreeSet;
use std::time::Instant;

use super::edge::IptablesEdge;
use super::save::SavedTables;
use super::{KUBE_PROXY_CANARY, RenderConfig, Renderer, Scope};
use crate::dataplane::naming::is_service_chain;
use crate::dataplane::{Backend, BackendError, SyncStats, iptables::cleanup};
use crate::model::{Changes, IpFamily, NodeInfo, Snapshot};

/// Computes a family's render settings for the current node facts.
pub type ConfigFn = Box<dyn Fn(IpFamily, &NodeInfo) -> RenderConfig + Send>;

struct FamilyState {
    family: IpFamily,
    renderer: Renderer,
    /// Per-service nat chains in the kernel, as of the last successful restore; `None`
    /// when unknown (read `iptables-save` before the next full sync).
    kernel_chains: Option<BTreeSet<String>>,
}

/// iptables mode for one or two families.
pub struct IptablesBackend<E: IptablesEdge> {
    edge: E,
    config: ConfigFn,
    families: Vec<FamilyState>,
}

impl<E: IptablesEdge> IptablesBackend<E> {
    /// A backend serving `families`, with settings from `config`.
    pub fn new(edge: E, families: &[IpFamily], config: ConfigFn) -> Self {
        let families = families
            .iter()
            .map(|f| FamilyState {
                family: *f,
                renderer: Renderer::new(config(*f, &NodeInfo::default())),
                kernel_chains: None,
            })
            .collect();
        Self {
            edge,
            config,
            families,
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

    /// Reads the kernel: per-service nat chains (ours or upstream's) and the jump rules that
    /// are missing, so the next full render adopts the former and inserts only the latter.
    fn read_kernel(&mut self, idx: usize) -> Result<BTreeSet<String>, BackendError> {
        let st = &mut self.families[idx];
        let nat = SavedTables::parse(&self.edge.save(st.family, Some("nat"))?);
        let filter = SavedTables::parse(&self.edge.save(st.family, Some("filter"))?);
        let existing: BTreeSet<String> = nat
            .chains_of("nat")
            .filter(|c| is_service_chain(c))
            .map(String::from)
            .collect();
        let missing = st
            .renderer
            .applicable_jumps()
            .into_iter()
            .filter(|j| {
                let saved = if j.table == "nat" { &nat } else { &filter };
                let wanted = format!("-A {} {}", j.from, j.args());
                !saved
                    .rules
                    .get(j.table)
                    .is_some_and(|r| r.contains(&wanted))
            })
            .collect();
        st.renderer.set_missing_jumps(missing);
        Ok(existing)
    }

    fn sync_family(
        &mut self,
        idx: usize,
        snap: &Snapshot,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncStats, BackendError> {
        let family = self.families[idx].family;
        let cfg = (self.config)(family, &snap.node);
        self.families[idx].renderer.set_config(cfg);
        let mut stats = SyncStats::default();
        let mut full = full
            || changes.node_changed
            || self.families[idx].kernel_chains.is_none()
            || !self.families[idx].renderer.can_render_partial(snap);
        loop {
            let rendered = if full {
                let existing = match self.families[idx].kernel_chains.take() {
                    Some(chains) => chains,
                    None => self.read_kernel(idx)?,
                };
                self.families[idx].renderer.render(
                    snap,
                    Scope::Full {
                        existing: &existing,
                    },
                )
            } else {
                self.families[idx].renderer.render(
                    snap,
                    Scope::Partial {
                        changed: &changes.services,
                    },
                )
            };
            // What the rules hold after this render, whether or not the kernel needs it.
            stats.no_local_internal = rendered.no_local_internal;
            stats.no_local_external = rendered.no_local_external;
            stats.rule_counts = vec![
                ("filter", rendered.filter_rules),
                ("nat", rendered.nat_rules),
            ];
            if rendered.noop && self.families[idx].renderer.pending_jumps_empty() {
                // Nothing of this family changed: leave its tables alone.
                return Ok(stats);
            }
            // A batch naming a large share of the table's chains is shaped for bulk loading
            // (see `edge::with_cache_prelude`): D² > 700·T, D chains named, T in the table.
            let named = rendered.chains_written.len() + rendered.chains_deleted.len() + 16;
            let in_table = self.families[idx]
                .kernel_chains
                .as_ref()
                .map_or(0, |c| c.len())
                + 16;
            let bulk = rendered.full || named * named > 700 * in_table;
            let started = Instant::now();
            let result = self.edge.restore(family, &rendered.text, bulk);
            stats.kernel_time += started.elapsed();
            stats.bytes += rendered.text.len();
            let st = &mut self.families[idx];
            match result {
                Ok(()) => {
                    st.renderer.set_insert_jumps(false);
                    stats.full = rendered.full;
                    stats.objects_written += rendered.chains_written.len();
                    // A full render wrote every chain, so its list is the whole mirror.
                    let mut chains = if rendered.full {
                        BTreeSet::new()
                    } else {
                        st.kernel_chains.take().unwrap_or_default()
                    };
                    for c in &rendered.chains_deleted {
                        chains.remove(c);
                    }
                    chains.extend(rendered.chains_written);
                    st.kernel_chains = Some(chains);
                    stats.objects_deleted += rendered.chains_deleted.len();
                    return Ok(stats);
                }
                Err(e) => {
                    st.kernel_chains = None;
                    st.renderer.invalidate();
                    if rendered.full {
                        return Err(e);
                    }
                    tracing::warn!(?family, error = %e, "partial iptables-restore failed; falling back to a full sync");
                    stats.partial_fell_back = true;
                    full = true;
                }
            }
        }
    }
}

impl<E: IptablesEdge> Backend for IptablesBackend<E> {
    fn sync(
        &mut self,
        snap: &Snapshot,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncStats, BackendError> {
        let mut total = SyncStats {
            full: true,
            ..SyncStats::default()
        };
        for idx in 0..self.families.len() {
            let s = self.sync_family(idx, snap, changes, full)?;
            total.full &= s.full;
            total.partial_fell_back |= s.partial_fell_back;
            total.objects_written += s.objects_written;
            total.objects_deleted += s.objects_deleted;
            total.bytes += s.bytes;
            total.no_local_internal += s.no_local_internal;
            total.no_local_external += s.no_local_external;
            total.kernel_time += s.kernel_time;
            for (table, n) in s.rule_counts {
                match total.rule_counts.iter_mut().find(|(t, _)| *t == table) {
                    Some((_, sum)) => *sum += n,
                    None => total.rule_counts.push((table, n)),
                }
            }
        }
        Ok(total)
    }

    fn rules_intact(&mut self) -> bool {
        let mut intact = true;
        for idx in 0..self.families.len() {
            let family = self.families[idx].family;
            if self.families[idx].kernel_chains.is_none() {
                continue; // nothing installed yet, or already due for a full sync
            }
            for table in ["nat", "filter"] {
                let ok = match self.edge.list_chain(family, table, KUBE_PROXY_CANARY) {
                    Ok(Some(rules)) => rules.contains("svcproxy canary"),
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!(?family, table, error = %e, "cannot check the canary chain");
                        true
                    }
                };
                if !ok {
                    tracing::warn!(
                        ?family,
                        table,
                        "iptables canary is gone: rules were flushed; resyncing everything"
                    );
                    self.families[idx].kernel_chains = None;
                    self.families[idx].renderer.invalidate();
                    intact = false;
                    break;
                }
            }
        }
        intact
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        for idx in 0..self.families.len() {
            let family = self.families[idx].family;
            cleanup::remove_rules(&mut self.edge, family)?;
            self.families[idx].kernel_chains = None;
            self.families[idx].renderer.invalidate();
            self.families[idx].renderer.set_insert_jumps(true);
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "iptables"
    }
}

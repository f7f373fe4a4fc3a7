//! Dataplane backends: each turns a [`Snapshot`] into kernel state.
//!
//! Every backend is split into a pure renderer, a pure differ and a thin kernel edge behind a
//! small trait with an in-memory fake, so all but the edge is testable without root.

pub mod iptables;
pub mod naming;
pub mod nftables;
pub mod userspace;

use std::time::Duration;

use crate::model::{Changes, Snapshot};

pub use crate::config::ProxyMode;

/// What one sync did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Every rule was rewritten (as opposed to only the changed services).
    pub full: bool,
    /// A partial update failed and was replaced by a full one.
    pub partial_fell_back: bool,
    /// Per-service chains (or equivalent objects) written.
    pub objects_written: usize,
    /// Per-service chains (or equivalent objects) deleted.
    pub objects_deleted: usize,
    /// Bytes handed to the kernel tool.
    pub bytes: usize,
    /// Service ports with ITP Local and no local endpoint.
    pub no_local_internal: usize,
    /// Service ports with ETP Local and no local endpoint.
    pub no_local_external: usize,
    /// Time spent in the kernel tool.
    pub kernel_time: Duration,
    /// Rules the proxy owns per table after the sync (`kubeproxy_sync_proxy_rules_iptables_total`),
    /// summed over families.
    pub rule_counts: Vec<(&'static str, usize)>,
    /// Objects (chains, sets, elements) found different from what the backend last
    /// committed when this sync verified the kernel (nftables periodic resync); nonzero
    /// means something else changed the rules. Export as a counter.
    pub drift: usize,
}

/// A kernel operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A kernel tool could not be started.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The tool.
        tool: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A kernel tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The tool and its arguments.
        tool: String,
        /// Exit status text.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// Cleanup finished but something is still installed.
    #[error("cleanup left {0} behind")]
    Leftovers(String),
    /// The userspace proxy's addresses, listeners or runtime failed.
    #[error(transparent)]
    Userspace(#[from] userspace::UserspaceError),
    /// A sysctl could not be set.
    #[error("cannot set sysctl {name}: {source}")]
    Sysctl {
        /// The sysctl path under /proc/sys.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A proxy mode's kernel programming.
pub trait Backend: Send {
    /// Brings the kernel in line with `snap`. `full` asks for a full rewrite (first sync,
    /// periodic resync, after a failure); otherwise only `changes` need to be applied. A
    /// backend may upgrade a partial sync to a full one and says so in the stats. On error
    /// the kernel must hold either the old or the new rules of each table, never a mix.
    fn sync(
        &mut self,
        snap: &Snapshot,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncStats, BackendError>;

    /// Cheap check that the installed rules are still there (e.g. a canary chain);
    /// false means someone flushed them and the next sync must be full.
    fn rules_intact(&mut self) -> bool;

    /// Removes everything this backend (or upstream kube-proxy's equivalent mode) installed.
    fn cleanup(&mut self) -> Result<(), BackendError>;

    /// The mode's name for logs and metrics labels.
    fn name(&self) -> &'static str;
}

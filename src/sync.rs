//! The sync runner: one sync at a time, bursts coalesced, never closer than
//! `min_sync_period`, a full sync at start, after any failure and at least every
//! `sync_period`, and a cheap canary check in between.
//!
//! Sources never call the backend: they update the [`ChangeTracker`] and [`SyncTrigger::kick`]
//! the runner. Nothing is synced before [`SyncTrigger::set_ready`] says the initial state is
//! complete, so a restart never programs a half-listed cluster. The runner is a plain thread:
//! backends run external tools and must not block an async runtime.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::dataplane::{Backend, SyncStats};
use crate::model::{ChangeTracker, Changes, Snapshot};

/// Timing of the runner (`--min-sync-period`, `--sync-period`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncSettings {
    /// Minimum time between the starts of two syncs (upstream default 1 s).
    pub min_sync_period: Duration,
    /// Maximum time between two full syncs (upstream default 30 s).
    pub sync_period: Duration,
    /// How often to check that the rules are still installed (canary).
    pub canary_period: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            canary_period: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Default)]
struct TriggerState {
    ready: bool,
    stop: bool,
    /// When the oldest change not yet synced arrived.
    pending_since: Option<Instant>,
    /// When the last change arrived.
    last_kick: Option<Instant>,
}

/// The handle sources and the daemon use to drive the runner; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct SyncTrigger {
    inner: Arc<(Mutex<TriggerState>, Condvar)>,
}

impl SyncTrigger {
    /// A new trigger (not ready).
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, TriggerState> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Something changed in the tracker: sync soon.
    pub fn kick(&self) {
        let mut st = self.state();
        let now = Instant::now();
        st.pending_since.get_or_insert(now);
        st.last_kick = Some(now);
        self.inner.1.notify_all();
    }

    /// The initial state is complete: syncing may start.
    pub fn set_ready(&self) {
        self.state().ready = true;
        self.inner.1.notify_all();
    }

    /// Whether the initial state was reported complete.
    pub fn is_ready(&self) -> bool {
        self.state().ready
    }

    /// Stops the runner after its current sync (rules stay installed).
    pub fn stop(&self) {
        self.state().stop = true;
        self.inner.1.notify_all();
    }

    /// When the last change was queued (`..._last_queued_timestamp_seconds`).
    pub fn last_kick(&self) -> Option<Instant> {
        self.state().last_kick
    }

    /// When the oldest unsynced change arrived (health: a queued update waiting too long).
    pub fn pending_since(&self) -> Option<Instant> {
        self.state().pending_since
    }
}

/// The outcome of one sync, handed to observers (metrics, health, conntrack cleanup).
#[derive(Debug)]
pub struct SyncReport {
    /// Backend stats, or the error text.
    pub result: Result<SyncStats, String>,
    /// A full sync was requested (start-up, periodic, after failure or tampering).
    pub full_requested: bool,
    /// What changed since the previous sync.
    pub changes: Changes,
    /// When the sync started.
    pub started: Instant,
    /// How long it took.
    pub duration: Duration,
    /// When the oldest change this sync carries arrived.
    pub queued_since: Option<Instant>,
    /// The installed rules were found changed behind the proxy's back (canary) since the
    /// previous sync; this sync restores them.
    pub drift_detected: bool,
}

/// Something that reacts to every completed sync.
pub trait SyncObserver: Send {
    /// Called after each sync with the snapshot it applied.
    fn synced(&mut self, report: &SyncReport, snapshot: &Snapshot);
}

/// Runs syncs until stopped; see the module docs.
pub struct SyncRunner {
    tracker: Arc<Mutex<ChangeTracker>>,
    backend: Box<dyn Backend>,
    trigger: SyncTrigger,
    settings: SyncSettings,
    observers: Vec<Box<dyn SyncObserver>>,
}

/// Why the runner woke up.
#[derive(Debug, Default)]
struct Due {
    /// `min_sync_period` has passed since the last sync started.
    sync_allowed: bool,
    periodic: bool,
    retry: bool,
    canary: bool,
    stop: bool,
}

impl SyncRunner {
    /// A runner syncing `tracker` into `backend`.
    pub fn new(
        tracker: Arc<Mutex<ChangeTracker>>,
        backend: Box<dyn Backend>,
        trigger: SyncTrigger,
        settings: SyncSettings,
    ) -> Self {
        Self {
            tracker,
            backend,
            trigger,
            settings,
            observers: Vec::new(),
        }
    }

    /// Adds an observer called after every sync.
    pub fn observe(&mut self, observer: Box<dyn SyncObserver>) {
        self.observers.push(observer);
    }

    /// Retry delay after `failures` consecutive failures: 1 s doubling up to the sync period.
    fn backoff(&self, failures: u32) -> Duration {
        let base = Duration::from_secs(1).max(self.settings.min_sync_period);
        let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        exp.min(self.settings.sync_period.max(base))
    }

    /// Blocks until a sync is due and allowed by `min_sync_period` since `last_start`, the
    /// canary check is due, or the runner is stopped.
    fn wait(
        &self,
        last_start: Option<Instant>,
        last_full: Option<Instant>,
        retry_at: Option<Instant>,
        next_canary: Instant,
    ) -> Due {
        let (lock, cv) = &*self.trigger.inner;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.stop {
                return Due {
                    stop: true,
                    ..Due::default()
                };
            }
            let now = Instant::now();
            let next_full = last_full.map(|t| t + self.settings.sync_period);
            let earliest = last_start.map(|t| t + self.settings.min_sync_period);
            let mut deadline = now + Duration::from_secs(3600);
            if st.ready {
                let due = Due {
                    sync_allowed: earliest.is_none_or(|e| now >= e),
                    // After a failure the retry backoff decides when to try again.
                    periodic: retry_at.is_none() && next_full.is_none_or(|t| now >= t),
                    retry: retry_at.is_some_and(|t| now >= t),
                    canary: now >= next_canary,
                    stop: false,
                };
                let wanted = st.pending_since.is_some() || due.periodic || due.retry;
                if (wanted && due.sync_allowed) || due.canary {
                    return due;
                }
                let wake = if wanted {
                    earliest
                } else {
                    next_full.into_iter().chain(retry_at).min()
                };
                for t in wake.into_iter().chain([next_canary]) {
                    deadline = deadline.min(t);
                }
            }
            let timeout = deadline
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            st = cv
                .wait_timeout(st, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Runs until [`SyncTrigger::stop`].
    pub fn run(mut self) {
        let mut last_start: Option<Instant> = None;
        let mut last_full: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut failures = 0u32;
        let mut force_full = true;
        let mut drift_detected = false;
        let mut next_canary = Instant::now() + self.settings.canary_period;
        loop {
            let due = self.wait(last_start, last_full, retry_at, next_canary);
            if due.stop {
                return;
            }
            if due.canary {
                next_canary = Instant::now() + self.settings.canary_period;
                if last_full.is_some() && !self.backend.rules_intact() {
                    tracing::warn!(
                        mode = self.backend.name(),
                        "installed rules were changed behind svcproxy's back; restoring them with a full sync"
                    );
                    force_full = true;
                    drift_detected = true;
                }
            }
            if !due.sync_allowed {
                continue;
            }
            let queued_since = self.trigger.state().pending_since.take();
            let full = force_full || due.periodic || due.retry;
            let (snapshot, changes) = self
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain();
            if !full && changes.is_empty() {
                continue;
            }
            let started = Instant::now();
            last_start = Some(started);
            let result = self.backend.sync(&snapshot, &changes, full);
            let duration = started.elapsed();
            match &result {
                Ok(stats) => {
                    if stats.full {
                        last_full = Some(started);
                    }
                    force_full = false;
                    failures = 0;
                    retry_at = None;
                    tracing::info!(
                        mode = self.backend.name(),
                        full = stats.full,
                        written = stats.objects_written,
                        deleted = stats.objects_deleted,
                        services_changed = changes.services.len(),
                        kernel_ms = stats.kernel_time.as_secs_f64() * 1e3,
                        drift = stats.drift,
                        elapsed_ms = duration.as_secs_f64() * 1e3,
                        "synced rules"
                    );
                }
                Err(e) => {
                    force_full = true;
                    failures += 1;
                    let backoff = self.backoff(failures);
                    retry_at = Some(Instant::now() + backoff);
                    tracing::error!(mode = self.backend.name(), error = %e, retry_in_s = backoff.as_secs_f64(), "sync failed; the next sync is full");
                }
            }
            let report = SyncReport {
                result: result.map_err(|e| e.to_string()),
                full_requested: full,
                changes,
                started,
                duration,
                queued_since,
                drift_detected: std::mem::take(&mut drift_detected),
            };
            for o in &mut self.observers {
                o.synced(&report, &snapshot);
            }
            // Drop before the next drain so the tracker can update the snapshot in place.
            drop(snapshot);
        }
    }
}

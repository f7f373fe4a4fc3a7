//! The sync runner's timing rules, with a recording fake backend: nothing before ready, a
//! full first sync, bursts coalesced, min-sync-period spacing, full retry after failure,
//! periodic full syncs and canary-triggered full syncs.

mod common;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::builders::{set_endpoints, tracker_with};
use svcproxy::dataplane::{Backend, BackendError, SyncStats};
use svcproxy::model::{ChangeTracker, Changes, Snapshot};
use svcproxy::sync::{SyncRunner, SyncSettings, SyncTrigger};

#[derive(Clone, Debug)]
struct Call {
    at: Instant,
    full: bool,
    services: usize,
}

#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
    fail_next: Arc<Mutex<u32>>,
    intact: Arc<Mutex<bool>>,
}

impl Recorder {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

struct FakeBackend(Recorder);

impl Backend for FakeBackend {
    fn sync(
        &mut self,
        _snap: &Snapshot,
        changes: &Changes,
        full: bool,
    ) -> Result<SyncStats, BackendError> {
        self.0.calls.lock().unwrap().push(Call {
            at: Instant::now(),
            full,
            services: changes.services.len(),
        });
        let mut fail = self.0.fail_next.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return Err(BackendError::Leftovers("injected".into()));
        }
        Ok(SyncStats {
            full,
            ..SyncStats::default()
        })
    }
    fn rules_intact(&mut self) -> bool {
        *self.0.intact.lock().unwrap()
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "fake"
    }
}

struct Harness {
    tracker: Arc<Mutex<ChangeTracker>>,
    trigger: SyncTrigger,
    rec: Recorder,
    thread: Option<thread::JoinHandle<()>>,
}

impl Harness {
    fn start(settings: SyncSettings) -> Harness {
        let tracker = Arc::new(Mutex::new(tracker_with(&["a", "b"])));
        let trigger = SyncTrigger::new();
        let rec = Recorder::default();
        *rec.intact.lock().unwrap() = true;
        let runner = SyncRunner::new(
            tracker.clone(),
            Box::new(FakeBackend(rec.clone())),
            trigger.clone(),
            settings,
        );
        let thread = Some(thread::spawn(move || runner.run()));
        Harness {
            tracker,
            trigger,
            rec,
            thread,
        }
    }

    fn change(&self, svc: &str, ips: &[&str]) {
        set_endpoints(&mut self.tracker.lock().unwrap(), svc, ips);
        self.trigger.kick();
    }

    fn wait_for_calls(&self, n: usize, timeout: Duration) -> Vec<Call> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let c = self.rec.calls();
            if c.len() >= n {
                return c;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.rec.calls()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.trigger.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn settings(min_ms: u64, period_ms: u64) -> SyncSettings {
    SyncSettings {
        min_sync_period: Duration::from_millis(min_ms),
        sync_period: Duration::from_millis(period_ms),
        canary_period: Duration::from_secs(3600),
    }
}

#[test]
fn nothing_is_synced_before_ready_then_a_full_sync() {
    let h = Harness::start(settings(10, 60_000));
    h.trigger.kick();
    thread::sleep(Duration::from_millis(150));
    assert!(
        h.rec.calls().is_empty(),
        "synced before the initial state was complete"
    );
    h.trigger.set_ready();
    let calls = h.wait_for_calls(1, Duration::from_secs(5));
    assert_eq!(calls.len(), 1);
    assert!(calls[0].full);
    assert_eq!(calls[0].services, 2);
}

#[test]
fn bursts_coalesce_and_respect_min_sync_period() {
    let h = Harness::start(settings(300, 60_000));
    h.trigger.set_ready();
    h.wait_for_calls(1, Duration::from_secs(5));
    // A burst of 20 changes right after a sync: one partial sync, no earlier than 300 ms.
    for i in 0..20 {
        h.change("a", &[&format!("10.244.9.{i}")]);
        h.change("b", &[&format!("10.244.8.{i}")]);
    }
    let calls = h.wait_for_calls(2, Duration::from_secs(5));
    thread::sleep(Duration::from_millis(400));
    let calls_after = h.rec.calls();
    assert_eq!(
        calls_after.len(),
        2,
        "the burst coalesced into one sync: {calls_after:?}"
    );
    assert!(!calls[1].full, "changes only: partial");
    assert_eq!(calls[1].services, 2);
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_millis(300),
        "min-sync-period violated: {gap:?}"
    );
}

#[test]
fn failure_forces_a_full_retry_with_backoff() {
    let h = Harness::start(settings(10, 60_000));
    *h.rec.fail_next.lock().unwrap() = 1;
    h.trigger.set_ready();
    let calls = h.wait_for_calls(2, Duration::from_secs(5));
    assert_eq!(calls.len(), 2, "retried after the failure");
    assert!(calls[1].full, "the retry is full");
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_millis(900),
        "retry waited for the backoff: {gap:?}"
    );
}

#[test]
fn periodic_full_sync() {
    let h = Harness::start(settings(10, 300));
    h.trigger.set_ready();
    let calls = h.wait_for_calls(3, Duration::from_secs(5));
    assert!(calls.len() >= 3);
    assert!(
        calls.iter().all(|c| c.full),
        "only periodic syncs happened: all full"
    );
    let gap = calls[2].at - calls[1].at;
    assert!(gap >= Duration::from_millis(280), "{gap:?}");
}

#[test]
fn broken_canary_forces_a_full_sync() {
    let mut s = settings(10, 60_000);
    s.canary_period = Duration::from_millis(100);
    let h = Harness::start(s);
    h.trigger.set_ready();
    h.wait_for_calls(1, Duration::from_secs(5));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(h.rec.calls().len(), 1, "intact canary: no resync");
    *h.rec.intact.lock().unwrap() = false;
    let calls = h.wait_for_calls(2, Duration::from_secs(5));
    assert!(calls.len() >= 2 && calls[1].full, "{calls:?}");
}

#[test]
fn stop_ends_the_runner() {
    let h = Harness::start(settings(10, 60_000));
    h.trigger.set_ready();
    h.wait_for_calls(1, Duration::from_secs(5));
    let start = Instant::now();
    drop(h);
    assert!(start.elapsed() < Duration::from_secs(2));
}

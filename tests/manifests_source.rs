//! The `--manifests-dir` source: files created, edited, renamed, deleted, broken and
//! duplicated reach the tracker as a user editing the directory would expect.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use svcproxy::model::{ChangeTracker, NodeInfo, ServiceName};
use svcproxy::source::manifests;
use svcproxy::sync::SyncTrigger;

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns, name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, dir.join(file)).unwrap();
}

/// Waits until the tracker's drained state satisfies `f` (applying every change so far).
fn eventually(
    tracker: &Arc<Mutex<ChangeTracker>>,
    what: &str,
    f: impl Fn(&svcproxy::model::Snapshot) -> bool,
) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let (snap, _) = tracker.lock().unwrap().drain();
        if f(&snap) {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}: {:?}",
            snap.ports.keys().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cluster_ip(snap: &svcproxy::model::Snapshot, name: &str) -> Option<String> {
    let svc = ServiceName::new("ns", name);
    snap.ports_of(&svc)
        .next()
        .map(|(_, st)| st.port.cluster_ips[0].to_string())
}

#[test]
fn directory_edits_apply_like_api_events() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &service("a", "10.0.0.1"));
    let tracker = Arc::new(Mutex::new(ChangeTracker::new(NodeInfo {
        name: "n".into(),
        ..NodeInfo::default()
    })));
    let trigger = SyncTrigger::new();
    let _watch = manifests::watch(dir.path(), "n", tracker.clone(), trigger.clone()).unwrap();
    assert!(trigger.is_ready(), "initial scan done before watch returns");
    eventually(&tracker, "initial load", |s| {
        cluster_ip(s, "a").as_deref() == Some("10.0.0.1")
    });

    // create
    write(dir.path(), "b.yaml", &service("b", "10.0.0.2"));
    eventually(&tracker, "create", |s| cluster_ip(s, "b").is_some());
    assert!(
        trigger.pending_since().is_some(),
        "the change kicked the runner"
    );
    // edit
    write(dir.path(), "b.yaml", &service("b", "10.0.0.22"));
    eventually(&tracker, "edit", |s| {
        cluster_ip(s, "b").as_deref() == Some("10.0.0.22")
    });
    // a broken edit keeps the last good version
    write(
        dir.path(),
        "b.yaml",
        "kind: Service\nmetadata: {name: [oops\n",
    );
    std::thread::sleep(Duration::from_millis(300));
    eventually(&tracker, "last good kept", |s| {
        cluster_ip(s, "b").as_deref() == Some("10.0.0.22")
    });
    // rename keeps the object
    fs::rename(dir.path().join("a.yaml"), dir.path().join("renamed.yml")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    eventually(&tracker, "rename", |s| {
        cluster_ip(s, "a").as_deref() == Some("10.0.0.1")
    });
    // the same object in a second file: the lexically last file wins, removing it restores the other
    write(dir.path(), "z.yaml", &service("a", "10.0.0.99"));
    eventually(&tracker, "duplicate wins", |s| {
        cluster_ip(s, "a").as_deref() == Some("10.0.0.99")
    });
    fs::remove_file(dir.path().join("z.yaml")).unwrap();
    eventually(&tracker, "duplicate removed", |s| {
        cluster_ip(s, "a").as_deref() == Some("10.0.0.1")
    });
    // delete
    fs::remove_file(dir.path().join("renamed.yml")).unwrap();
    eventually(&tracker, "delete", |s| cluster_ip(s, "a").is_none());
    // subdirectories are watched too
    fs::create_dir(dir.path().join("sub")).unwrap();
    write(&dir.path().join("sub"), "c.yaml", &service("c", "10.0.0.3"));
    eventually(&tracker, "subdirectory", |s| cluster_ip(s, "c").is_some());
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let tracker = Arc::new(Mutex::new(ChangeTracker::new(NodeInfo::default())));
    let err = manifests::watch(
        Path::new("/does/not/exist"),
        "n",
        tracker,
        SyncTrigger::new(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("--manifests-dir /does/not/exist"),
        "{err}"
    );
}

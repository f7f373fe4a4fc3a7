//! The `svcproxy render` command as a user runs it: exit codes and messages.

use std::process::{Command, Output};

fn svcproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("run svcproxy")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_objects_are_named_and_skipped() {
    let out = svcproxy(&[
        "render",
        "-f",
        "examples/invalid",
        "--hostname-override",
        "node-a",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "Service shop/bad-ip: spec.clusterIPs[0]: \"10.96.0.300\" is not a valid IP address"
        ),
        "{err}"
    );
    assert!(err.contains("Service shop/bad-port"), "{err}");
    assert!(
        err.contains("EndpointSlice shop/orphan-1: label kubernetes.io/service-name is missing"),
        "{err}"
    );
    assert_eq!(err.matches("warning: skipped").count(), 3, "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"shop/fine has no endpoints\""),
        "the valid service is still rendered"
    );
    assert!(!text.contains("bad-ip"));
}

#[test]
fn unreadable_file_fails_with_its_path() {
    let out = svcproxy(&["render", "-f", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read does/not/exist.yaml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn invalid_yaml_fails_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, "kind: Service\nmetadata: {name: [unclosed\n").unwrap();
    let out = svcproxy(&["render", "-f", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("broken.yaml") && err.contains("not valid YAML/JSON"),
        "{err}"
    );
}

#[test]
fn unknown_flag_is_rejected() {
    let out = svcproxy(&["render", "-f", "examples/cluster", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--no-such-flag"), "{}", stderr(&out));
}

#[test]
fn incomplete_detect_local_mode_is_explained() {
    let out = svcproxy(&[
        "render",
        "-f",
        "examples/cluster",
        "--detect-local-mode",
        "BridgeInterface",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--detect-local-mode BridgeInterface needs --pod-bridge-interface"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn json_and_list_inputs_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.json");
    std::fs::write(
        &path,
        r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service",
        "metadata":{"namespace":"a","name":"b"},"spec":{"clusterIP":"10.0.0.1","ports":[{"port":80}]}}]}"#,
    )
    .unwrap();
    let out = svcproxy(&["render", "-f", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("\"a/b has no endpoints\" -m tcp -p tcp -d 10.0.0.1 --dport 80 -j REJECT")
    );
}

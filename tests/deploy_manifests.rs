//! The deployment manifests in `manifests/` as the API server and the binary will see them:
//! every object is a valid Kubernetes object with no field its type does not know, the RBAC
//! grants exactly what the proxy needs, the ConfigMap holds a configuration svcproxy accepts
//! without warnings, and the DaemonSet runs the binary with flags it accepts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Every document of every YAML file under `manifests/`, with the file it came from.
fn documents() -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read manifests/")
        .map(|e| e.expect("list manifests/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read manifest");
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        docs.extend(
            parsed
                .into_iter()
                .filter(|d| !d.is_null())
                .map(|d| (file.clone(), d)),
        );
    }
    docs
}

/// Deserializes `doc` into `T`, failing with the path of every field `T` drops (an unknown
/// field) or reads back differently: serde ignores unknown fields, so a typo such as
/// `readonly:` would otherwise pass unnoticed and be dropped by the API server.
fn typed<T: DeserializeOwned + Serialize>(file: &Path, doc: &Value) -> T {
    let object: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let back = serde_json::to_value(&object).expect("serialize");
    let mut problems = Vec::new();
    compare(doc, &back, "", &mut problems);
    assert!(
        problems.is_empty(),
        "{}: {}",
        file.display(),
        problems.join("; ")
    );
    object
}

fn compare(original: &Value, back: &Value, path: &str, problems: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (key, value) in o {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match b.get(key) {
                    // An explicit null is "unset" to the API server too.
                    None if value.is_null() => {}
                    None => problems.push(format!("{child}: unknown field")),
                    Some(b) => compare(value, b, &child, problems),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (o, b)) in o.iter().zip(b).enumerate() {
                compare(o, b, &format!("{path}[{i}]"), problems);
            }
        }
        _ if original == back => {}
        _ => problems.push(format!("{path}: {original} reads back as {back}")),
    }
}

fn kinds() -> Vec<(PathBuf, String, Value)> {
    documents()
        .into_iter()
        .map(|(file, doc)| {
            let kind = doc["kind"].as_str().unwrap_or("").to_string();
            (file, kind, doc)
        })
        .collect()
}

fn only<T: DeserializeOwned + Serialize>(kind: &str) -> T {
    let mut found: Vec<T> = kinds()
        .into_iter()
        .filter(|(_, k, _)| k == kind)
        .map(|(file, _, doc)| typed(&file, &doc))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} in manifests/");
    found.remove(0)
}

#[test]
fn every_object_is_a_known_kind_without_unknown_fields() {
    let mut seen = BTreeSet::new();
    for (file, kind, doc) in kinds() {
        match kind.as_str() {
            "ServiceAccount" => drop(typed::<ServiceAccount>(&file, &doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(&file, &doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&file, &doc)),
            "ConfigMap" => drop(typed::<ConfigMap>(&file, &doc)),
            "DaemonSet" => drop(typed::<DaemonSet>(&file, &doc)),
            other => panic!("{}: unexpected kind {other:?}", file.display()),
        }
        seen.insert(kind);
    }
    let expected: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "ServiceAccount",
    ]
    .map(String::from)
    .into();
    assert_eq!(seen, expected);
}

#[test]
fn the_unknown_field_check_names_a_typo() {
    // The check above is only worth something if it catches a misspelt field.
    let doc: Value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "svcproxy", "namespace": "kube-system", "label": {"a": "b"}},
    });
    let object: ServiceAccount = serde_json::from_value(doc.clone()).unwrap();
    let mut problems = Vec::new();
    compare(
        &doc,
        &serde_json::to_value(&object).unwrap(),
        "",
        &mut problems,
    );
    assert_eq!(problems, ["metadata.label: unknown field"]);
}

#[test]
fn rbac_grants_exactly_what_the_proxy_uses() {
    let role: ClusterRole = only("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert(format!("{group}/{resource}:{verb}"));
        }
    }
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            expected.insert(format!("{group}/events:{verb}"));
        }
    }
    assert_eq!(granted, expected);

    let binding: ClusterRoleBinding = only("ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let account: ServiceAccount = only("ServiceAccount");
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
    assert_eq!(account.metadata.namespace.as_deref(), Some("kube-system"));
}

fn config_conf() -> String {
    let map: ConfigMap = only("ConfigMap");
    assert_eq!(map.metadata.name.as_deref(), Some("svcproxy"));
    assert_eq!(map.metadata.namespace.as_deref(), Some("kube-system"));
    map.data
        .unwrap_or_default()
        .remove("config.conf")
        .expect("ConfigMap svcproxy has config.conf")
}

#[test]
fn configmap_holds_a_config_svcproxy_accepts_without_warnings() {
    let (settings, warnings) =
        svcproxy::config_file::parse(&config_conf()).expect("config.conf parses");
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(settings.proxy_mode.as_deref(), Some("iptables"));
    assert!(!settings.cluster_cidr.is_empty(), "clusterCIDR is set");
}

fn container(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.template.spec.as_ref().expect("pod spec");
    let containers: Vec<&Container> = spec
        .containers
        .iter()
        .filter(|c| c.name == "svcproxy")
        .collect();
    assert_eq!(containers.len(), 1, "one container named svcproxy");
    containers[0]
}

#[test]
fn daemonset_runs_on_every_node_in_the_host_network_namespace() {
    let ds: DaemonSet = only("DaemonSet");
    let spec = &ds.spec;
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("svcproxy"));
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );

    let c = container(&ds);
    assert_eq!(
        c.command.as_deref(),
        Some(&["/usr/local/bin/svcproxy".to_string()][..])
    );
    let security = c.security_context.as_ref().expect("securityContext");
    assert_ne!(security.privileged, Some(true), "runs unprivileged");
    let caps = security.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert!(
        added.contains("NET_ADMIN") && added.contains("NET_RAW"),
        "{added:?}"
    );
    assert!(!added.contains("SYS_ADMIN"), "{added:?}");

    let probe = c.liveness_probe.as_ref().and_then(|p| p.http_get.as_ref());
    let probe = probe.expect("livenessProbe.httpGet");
    assert_eq!(probe.path.as_deref(), Some("/livez"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
    );

    let volumes = pod.volumes.clone().unwrap_or_default();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"))
            .clone()
    };
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
            .clone()
    };
    let lock = mount_of("/run/xtables.lock");
    let lock_source = volume(&lock.name)
        .host_path
        .expect("xtables lock is a hostPath");
    assert_eq!(lock_source.path, "/run/xtables.lock");
    assert_eq!(lock_source.type_.as_deref(), Some("FileOrCreate"));
    assert_ne!(lock.read_only, Some(true), "the lock is taken, so writable");
    let modules = mount_of("/lib/modules");
    assert_eq!(modules.read_only, Some(true));
    assert_eq!(
        volume(&modules.name).host_path.map(|h| h.path).as_deref(),
        Some("/lib/modules")
    );
    let config = mount_of("/var/lib/svcproxy");
    assert_eq!(
        volume(&config.name).config_map.map(|c| c.name),
        Some("svcproxy".to_string())
    );
}

/// The container's args with `$(VAR)` expanded as the kubelet would (NODE_NAME from
/// `spec.nodeName`) and `--config` pointing at `config`.
fn container_args(c: &Container, node: &str, config: &Path) -> Vec<String> {
    let env = c.env.clone().unwrap_or_default();
    let node_var = env
        .iter()
        .find(|e| {
            e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .is_some_and(|f| f.field_path == "spec.nodeName")
        })
        .expect("an env var from spec.nodeName");
    let pattern = format!("$({})", node_var.name);
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--config=/var/lib/svcproxy/config.conf".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&format!("--hostname-override={pattern}")),
        "{args:?}"
    );
    args.iter()
        .map(|a| {
            if a.starts_with("--config=") {
                format!("--config={}", config.display())
            } else {
                a.replace(&pattern, node)
            }
        })
        .collect()
}

fn check_config(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svcproxy"))
        .args(args)
        .arg("--check-config")
        .output()
        .expect("run svcproxy")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn daemonset_args_are_accepted_by_the_binary() {
    let ds: DaemonSet = only("DaemonSet");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.conf");
    std::fs::write(&config, config_conf()).expect("write config");
    let args = container_args(container(&ds), "node-under-test", &config);
    let out = check_config(&args);
    assert!(
        out.status.success(),
        "svcproxy {args:?} --check-config:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("node-under-test"),
        "the effective settings show the node name:\n{}",
        text(&out)
    );

    // The same args with a misspelt field in the file must fail and name it, so the success
    // above means the file was read.
    let broken = config_conf().replace("masqueradeBit:", "masqueradeBits:");
    assert_ne!(
        broken,
        config_conf(),
        "the ConfigMap sets iptables.masqueradeBit"
    );
    std::fs::write(&config, broken).expect("write config");
    let out = check_config(&args);
    assert!(
        !out.status.success(),
        "accepted a misspelt field:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("iptables.masqueradeBits"),
        "names the field:\n{}",
        text(&out)
    );
}

//! Shared by the `cloudrun_*` tests: the Cloud Run manifests under `deploy/cloudrun/`, read,
//! rendered the way `deploy.sh` renders them, and taken apart.
//!
//! Included with `#[path = "cloudrun_support.rs"] mod support;`; as a test target of its own it
//! holds no tests.
#![allow(dead_code)] // each test file uses its own part

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use serde_yaml_ng::Value;

/// The services in deploy order: each one's URL is the next one's `UPSTREAM_URL`.
pub(crate) const SERVICES: [&str; 3] = ["ping", "relay", "gateway"];

/// The project every rendering and fake run uses.
pub(crate) const PROJECT: &str = "demo-project";

/// `deploy/cloudrun/` in this checkout.
pub(crate) fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/cloudrun")
}

/// The unrendered manifest of `service`.
pub(crate) fn template(service: &str) -> String {
    let path = deploy_dir().join(format!("{service}.yaml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `${NAME}` in `text`.
pub(crate) fn placeholders(text: &str) -> BTreeSet<String> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// The `URL` placeholder naming `service`'s own URL, e.g. `PING_URL`.
pub(crate) fn url_placeholder(service: &str) -> String {
    format!("{}_URL", service.to_uppercase())
}

/// A URL in the form Cloud Run gives, for `service`.
pub(crate) fn sample_url(service: &str) -> String {
    format!("https://{service}-abc123-ew.a.run.app")
}

/// The values `deploy.sh` would fill into `service`'s manifest, with sample URLs.
pub(crate) fn sample_values(service: &str) -> BTreeMap<String, String> {
    let mut values: BTreeMap<String, String> = [
        ("PROJECT_ID", PROJECT.to_string()),
        ("REGION", "europe-west1".to_string()),
        (
            "IMAGE",
            format!("europe-west1-docker.pkg.dev/{PROJECT}/runmesh/{service}:test"),
        ),
        ("MIN_INSTANCES", "0".to_string()),
        ("GATEWAY_ALLOWED_CALLERS", "dev@example.com".to_string()),
        ("GATEWAY_IAM_CHECK_OFF", "false".to_string()),
        ("GATEWAY_AUTH_MODE", "cloud-run".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for s in SERVICES {
        values.insert(url_placeholder(s), sample_url(s));
    }
    values
}

/// `text` with each `${NAME}` replaced from `values`; panics if one has no value.
pub(crate) fn render(text: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for (name, value) in values {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    let left = placeholders(&out);
    assert!(left.is_empty(), "placeholders without a value: {left:?}");
    out
}

/// Parses one YAML document.
pub(crate) fn parse(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("not YAML: {e}\n{text}"))
}

/// `service`'s manifest rendered with [`sample_values`] and parsed.
pub(crate) fn rendered(service: &str) -> Value {
    rendered_with(service, &[])
}

/// `service`'s manifest rendered with [`sample_values`] changed by `overrides`, and parsed.
pub(crate) fn rendered_with(service: &str, overrides: &[(&str, &str)]) -> Value {
    let mut values = sample_values(service);
    for (name, value) in overrides {
        values.insert(name.to_string(), value.to_string());
    }
    parse(&render(&template(service), &values))
}

/// What `deploy.sh --public-gateway` fills in instead of the defaults.
pub(crate) const PUBLIC_GATEWAY: [(&str, &str); 2] = [
    ("GATEWAY_IAM_CHECK_OFF", "true"),
    ("GATEWAY_AUTH_MODE", "verify"),
];

/// The value at `path` (mapping keys, or indexes for sequences); panics naming the path.
pub(crate) fn at<'a>(doc: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(doc, |v, key| {
        let next = match key.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(key),
        };
        next.unwrap_or_else(|| panic!("no {path} (stopped at {key:?})"))
    })
}

/// The string at `path`.
pub(crate) fn str_at<'a>(doc: &'a Value, path: &str) -> &'a str {
    at(doc, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

/// The string under the one mapping key `key`, which may hold dots (`run.googleapis.com/…`).
pub(crate) fn key<'a>(map: &'a Value, key: &str) -> &'a str {
    map.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string under {key:?}"))
}

/// The number at `path`.
pub(crate) fn int_at(doc: &Value, path: &str) -> i64 {
    at(doc, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{path} is not an integer"))
}

/// The manifest's one container.
pub(crate) fn container(doc: &Value) -> &Value {
    let containers = at(doc, "spec.template.spec.containers")
        .as_sequence()
        .expect("containers is a list");
    assert_eq!(containers.len(), 1, "one container per service");
    &containers[0]
}

/// The container's env as name → value, refusing duplicate names and `valueFrom`.
pub(crate) fn env(doc: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for var in at(container(doc), "env")
        .as_sequence()
        .expect("env is a list")
    {
        let name = str_at(var, "name").to_string();
        let value = match at(var, "value") {
            Value::String(s) => s.clone(),
            other => panic!("{name}: value {other:?} is not a string"),
        };
        assert!(
            out.insert(name.clone(), value).is_none(),
            "{name} set twice"
        );
    }
    out
}

//! `docker-compose.yml`, the Dockerfiles and the observability profile's collector config, read
//! as the engine and the collector would read them. `deploy/compose/e2e.sh` runs the mesh for
//! real where a Docker engine answers; these checks hold everywhere, so a wrong allow-list, an
//! env name no service reads, a root user or a collector pipeline naming a missing exporter fails
//! `cargo test` before anyone builds an image.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use runmesh_config::Recorder;
use runmesh_forward::Role;
use serde_yaml_ng::Value;

/// Names read by libraries rather than by the services' config: the log filter, the OTLP
/// exporter and google-cloud-auth's metadata server.
const READ_BY_LIBRARIES: [&str; 3] = [
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "GCE_METADATA_HOST",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: impl AsRef<Path>) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A YAML file with its `<<:` merge keys applied, as compose reads it.
fn yaml(path: &str) -> Value {
    let mut value: Value =
        serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    value
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
}

/// `${NAME:-default}` as compose interpolates it with `NAME` unset.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("unclosed ${") + start;
        let expr = &rest[start + 2..end];
        out.push_str(expr.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A service's environment, interpolated, as the container sees it.
fn environment(compose: &Value, name: &str) -> HashMap<String, String> {
    let Some(env) = service(compose, name)["environment"].as_mapping() else {
        return HashMap::new();
    };
    env.iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => interpolate(s),
                other => serde_yaml_ng::to_string(other).unwrap().trim().to_string(),
            };
            (k.as_str().unwrap().to_string(), value)
        })
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("not a list: {value:?}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

/// The email the identity server answers for on the metadata server `host:port` names.
fn identity_on(compose: &Value, metadata_host: &str) -> String {
    let port = metadata_host
        .strip_prefix("idp:")
        .unwrap_or_else(|| panic!("metadata host {metadata_host} is not the identity server"));
    strings(&service(compose, "idp")["command"])
        .iter()
        .filter_map(|arg| arg.strip_prefix("--identity="))
        .filter_map(|spec| spec.rsplit_once('='))
        .find(|(_, addr)| addr.ends_with(&format!(":{port}")))
        .map(|(email, _)| email.to_string())
        .unwrap_or_else(|| panic!("the identity server serves no identity on port {port}"))
}

#[test]
fn every_variable_compose_sets_is_read_and_parses() {
    let compose = compose();
    for name in ["ping", "relay", "gateway"] {
        let vars = environment(&compose, name);
        let recorder = Recorder::new(vars.clone());
        let parsed = match name {
            "ping" => runmesh_ping::Config::from_env(&recorder).map(drop),
            "relay" => runmesh_forward::Config::from_env(Role::Relay, &recorder).map(drop),
            _ => runmesh_forward::Config::from_env(Role::Gateway, &recorder).map(drop),
        };
        parsed.unwrap_or_else(|e| panic!("{name}: compose's env is refused: {e}"));
        let read = recorder.seen();
        let unread: BTreeSet<_> = vars
            .keys()
            .filter(|k| !read.contains(*k) && !READ_BY_LIBRARIES.contains(&k.as_str()))
            .collect();
        assert!(
            unread.is_empty(),
            "{name} sets {unread:?}, which nothing reads"
        );
        assert_eq!(vars["AUTH_MODE"], "verify", "{name}: auth must be on");
    }
}

/// users → gateway → relay → ping, and nobody else: each forwarder's identity is exactly its
/// upstream's allow-list, and it asks for the audience its upstream accepts.
#[test]
fn each_hop_admits_only_the_hop_before_it() {
    let compose = compose();
    for (caller, upstream) in [("gateway", "relay"), ("relay", "ping")] {
        let from = environment(&compose, caller);
        let to = environment(&compose, upstream);
        let identity = identity_on(&compose, &from["GCE_METADATA_HOST"]);
        assert_eq!(
            to["AUTH_ALLOWED_CALLERS"], identity,
            "{upstream} must admit {caller}'s identity alone"
        );
        let url = format!("http://{upstream}:8080");
        assert_eq!(
            from["UPSTREAM_URL"], url,
            "{caller} reaches {upstream} by name"
        );
        assert_eq!(from["UPSTREAM_AUDIENCE"], url);
        assert_eq!(from["UPSTREAM_AUTH"], "google");
        assert!(
            to["AUTH_AUDIENCE"].split(',').any(|a| a == url),
            "{upstream} must accept the audience {caller} mints for"
        );
    }
    let gateway = environment(&compose, "gateway");
    assert_eq!(
        gateway["AUTH_ALLOWED_CALLERS"], "",
        "by default any verified user may call the gateway"
    );
    assert!(
        gateway["AUTH_AUDIENCE"]
            .split(',')
            .any(|a| a == "http://localhost:8080"),
        "users call the gateway as http://localhost:8080"
    );
}

#[test]
fn only_the_gateway_is_published_and_only_on_loopback() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    for (name, spec) in services {
        let name = name.as_str().unwrap();
        let ports = spec.get("ports").map(strings).unwrap_or_default();
        match name {
            "gateway" => assert_eq!(ports, ["127.0.0.1:${RUNMESH_GATEWAY_PORT:-8080}:8080"]),
            // The trace viewer's UI, in the opt-in profile.
            "jaeger" => assert_eq!(ports, ["127.0.0.1:16686:16686"]),
            _ => assert!(ports.is_empty(), "{name} is published: {ports:?}"),
        }
    }
}

/// Every service is probed with the binary's own `healthcheck` and starts only once what it
/// calls is healthy.
#[test]
fn services_wait_for_healthy_dependencies() {
    let compose = compose();
    for (name, needs) in [
        ("ping", &["idp"][..]),
        ("relay", &["idp", "ping"]),
        ("gateway", &["idp", "relay"]),
    ] {
        let spec = service(&compose, name);
        assert_eq!(
            strings(&spec["healthcheck"]["test"]),
            ["CMD", "/app/service", "healthcheck"],
            "{name}"
        );
        for need in needs {
            assert_eq!(
                spec["depends_on"][*need]["condition"].as_str(),
                Some("service_healthy"),
                "{name} must wait for {need}"
            );
        }
    }
}

/// The final stage of a Dockerfile: its `FROM` and `USER` lines, continuation lines joined.
fn final_stage(path: &str) -> (String, Option<String>) {
    let text = read(path).replace("\\\n", " ");
    let mut from = None;
    let mut user = None;
    for line in text.lines().map(str::trim) {
        if let Some(image) = line.strip_prefix("FROM ") {
            from = Some(image.to_string());
            user = None;
        } else if let Some(u) = line.strip_prefix("USER ") {
            user = Some(u.trim().to_string());
        }
    }
    (from.unwrap_or_else(|| panic!("{path} has no FROM")), user)
}

#[test]
fn images_run_as_a_numeric_non_root_user() {
    let (built, built_user) = final_stage("Dockerfile");
    let (prebuilt, prebuilt_user) = final_stage("deploy/docker/Dockerfile.prebuilt");
    assert_eq!(
        built, prebuilt,
        "both Dockerfiles must ship on the same base"
    );
    assert_eq!(built_user, prebuilt_user);
    let user = built_user.expect("the runtime stage sets USER");
    // Numeric, so Kubernetes' and Cloud Run's runAsNonRoot checks can verify it without
    // reading /etc/passwd; neither the user nor the group may be 0.
    for id in user.split(':') {
        let id: u32 = id
            .parse()
            .unwrap_or_else(|_| panic!("USER {user} is not numeric"));
        assert_ne!(id, 0, "USER {user} is root");
    }
}

/// The observability profile's collector: receives OTLP/gRPC where the services are told to
/// send it, and every pipeline names only components the config defines, sending traces to a
/// service of the same profile.
#[test]
fn the_collector_config_is_complete() {
    let compose = compose();
    let collector = service(&compose, "otel-collector");
    assert_eq!(strings(&collector["profiles"]), ["observability"]);
    let mount = strings(&collector["volumes"])
        .into_iter()
        .find(|v| v.ends_with(":/etc/otelcol/config.yaml:ro"))
        .expect("the collector's config is mounted");
    let (source, _) = mount.split_once(':').unwrap();
    let config = yaml(source.trim_start_matches("./"));
    assert!(
        strings(&collector["command"]).contains(&"--config=/etc/otelcol/config.yaml".to_string())
    );

    assert_eq!(
        config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].as_str(),
        Some("0.0.0.0:4317"),
        "the services export to http://otel-collector:4317"
    );
    let pipelines = config["service"]["pipelines"].as_mapping().unwrap();
    let names: BTreeSet<_> = pipelines.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(names, BTreeSet::from(["metrics", "traces"]));
    for (pipeline, spec) in pipelines {
        for kind in ["receivers", "processors", "exporters"] {
            for component in strings(&spec[kind]) {
                assert!(
                    config[kind].get(component.as_str()).is_some(),
                    "pipeline {pipeline:?} names {kind} {component}, which is not defined"
                );
            }
        }
    }
    let traces_to = config["exporters"]["otlp/jaeger"]["endpoint"]
        .as_str()
        .unwrap();
    let (host, _) = traces_to.split_once(':').unwrap();
    let viewer = service(&compose, host);
    assert_eq!(strings(&viewer["profiles"]), ["observability"]);
    assert_eq!(
        viewer["environment"]["COLLECTOR_OTLP_ENABLED"].as_str(),
        Some("true")
    );
}

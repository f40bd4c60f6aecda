//! The `relay` binary refuses to start without a usable `UPSTREAM_URL`.

use std::process::Command;

#[test]
fn a_missing_or_non_http_upstream_url_stops_startup_naming_it() {
    for (value, expected) in [
        (None, "UPSTREAM_URL is required but not set"),
        (Some("ping:8080"), "UPSTREAM_URL=\"ping:8080\" is invalid"),
        (
            Some("grpc://ping:8080"),
            "scheme \"grpc\" is not http or https",
        ),
    ] {
        let mut cmd = Command::new(runmesh_testkit::bin("relay"));
        cmd.env("AUTH_MODE", "off").env_remove("UPSTREAM_URL");
        if let Some(v) = value {
            cmd.env("UPSTREAM_URL", v);
        }
        let out = cmd.output().expect("run relay");
        assert_eq!(out.status.code(), Some(64), "{value:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{value:?}: {err}");
    }
}

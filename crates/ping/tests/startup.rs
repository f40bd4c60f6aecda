//! The `ping` binary refuses bad configuration at startup, naming the variable and value.

use std::process::Command;

#[test]
fn a_bad_port_stops_startup_with_ex_usage_naming_port() {
    for bad in ["eighty", "70000", "-1"] {
        let out = Command::new(runmesh_testkit::bin("ping"))
            .env("PORT", bad)
            .env("AUTH_MODE", "off")
            .output()
            .expect("run ping");
        assert_eq!(out.status.code(), Some(64), "PORT={bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("PORT={bad:?} is invalid")),
            "PORT={bad}: {err}"
        );
    }
}

#[test]
fn verify_mode_without_an_audience_is_refused() {
    let out = Command::new(runmesh_testkit::bin("ping"))
        .env_remove("AUTH_MODE")
        .env_remove("AUTH_AUDIENCE")
        .output()
        .expect("run ping");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH_AUDIENCE"));
}

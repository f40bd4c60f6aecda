//! The `gateway` binary's command line: `healthcheck`, and refusals that name what is wrong.

use std::process::Command;

use runmesh_testkit::{Service, bin, free_port};

#[tokio::test]
async fn healthcheck_succeeds_only_against_a_serving_port() {
    let port = free_port();
    let out = Command::new(bin("gateway"))
        .arg("healthcheck")
        .env("PORT", port.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "nothing listens on {port}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));

    let gateway = Service::start(
        "gateway",
        &[
            ("AUTH_MODE", "off".into()),
            ("UPSTREAM_AUTH", "off".into()),
            ("UPSTREAM_URL", "http://127.0.0.1:1".into()),
        ],
    )
    .await;
    let out = Command::new(bin("gateway"))
        .arg("healthcheck")
        .env("PORT", gateway.port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_arguments_and_bad_auth_mode_exit_with_ex_usage() {
    let out = Command::new(bin("gateway")).arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(bin("gateway"))
        .env("AUTH_MODE", "maybe")
        .env("UPSTREAM_URL", "http://relay:8080")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH_MODE=\"maybe\""));
}

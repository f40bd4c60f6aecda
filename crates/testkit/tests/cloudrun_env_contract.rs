//! Every variable a Cloud Run manifest sets is one its service's config actually reads, and the
//! manifest's env parses into a valid config.
//!
//! The list of names read comes from the config code itself, through
//! [`runmesh_config::Recorder`], so the manifests and the binaries cannot drift apart.

#[path = "cloudrun_support.rs"]
mod support;

use std::collections::{BTreeSet, HashMap};

use runmesh_config::{ConfigError, Recorder};
use runmesh_forward::Role;
use support::{PUBLIC_GATEWAY, SERVICES, env, rendered, rendered_with};

/// Parses `service`'s config from `vars` as its binary does; returns the names it looked up.
fn read_by(service: &str, vars: HashMap<String, String>) -> Result<BTreeSet<String>, ConfigError> {
    let recorder = Recorder::new(vars);
    match service {
        "ping" => runmesh_ping::Config::from_env(&recorder).map(drop)?,
        "relay" => runmesh_forward::Config::from_env(Role::Relay, &recorder).map(drop)?,
        "gateway" => runmesh_forward::Config::from_env(Role::Gateway, &recorder).map(drop)?,
        other => panic!("no config for {other}"),
    }
    Ok(recorder.seen())
}

#[test]
fn every_variable_a_manifest_sets_is_read_by_its_service() {
    let renderings = SERVICES
        .map(|s| (s, rendered(s)))
        .into_iter()
        .chain([("gateway", rendered_with("gateway", &PUBLIC_GATEWAY))]);
    for (service, manifest) in renderings {
        let vars: HashMap<_, _> = env(&manifest).into_iter().collect();
        let set: BTreeSet<_> = vars.keys().cloned().collect();
        let read = read_by(service, vars)
            .unwrap_or_else(|e| panic!("{service}: its manifest's env is refused: {e}"));
        let unread: Vec<_> = set.difference(&read).collect();
        assert!(
            unread.is_empty(),
            "{service} sets {unread:?}, which its config never reads"
        );
    }
}

#[test]
fn forwarders_refuse_to_start_without_their_upstream() {
    for service in ["relay", "gateway"] {
        let mut vars: HashMap<_, _> = env(&rendered(service)).into_iter().collect();
        vars.remove("UPSTREAM_URL");
        assert_eq!(
            read_by(service, vars),
            Err(ConfigError::Missing {
                var: "UPSTREAM_URL"
            }),
            "{service}"
        );
    }
}

//! The Cloud Run manifests under `deploy/cloudrun/` keep the invariants the deploy relies on:
//! end-to-end HTTP/2, gRPC health probes, one service account per service, stream-length
//! timeouts, and relay and ping admitting only their caller.
//!
//! Cloud Run cannot be reached from here, so these read the YAML that `gcloud run services
//! replace` would be given.

#[path = "cloudrun_support.rs"]
mod support;

use std::collections::BTreeSet;

use support::{
    PROJECT, SERVICES, at, container, env, int_at, key, placeholders, rendered, str_at, template,
    url_placeholder,
};

/// The audience of every ID token `gcloud auth print-identity-token` mints for a user account.
const GCLOUD_AUDIENCE: &str = "32555940559.apps.googleusercontent.com";

fn sa(service: &str) -> String {
    format!("{service}-sa@${{PROJECT_ID}}.iam.gserviceaccount.com")
}

/// Each manifest unrendered, parsed: placeholders are plain strings to YAML.
fn raw(service: &str) -> serde_yaml_ng::Value {
    support::parse(&template(service))
}

#[test]
fn every_manifest_is_a_knative_service_named_for_its_binary() {
    for service in SERVICES {
        let doc = raw(service);
        assert_eq!(str_at(&doc, "apiVersion"), "serving.knative.dev/v1");
        assert_eq!(str_at(&doc, "kind"), "Service");
        assert_eq!(str_at(&doc, "metadata.name"), service);
        let labels = at(&doc, "metadata.labels");
        assert_eq!(key(labels, "cloud.googleapis.com/location"), "${REGION}");
    }
}

#[test]
fn every_service_speaks_h2c_on_8080() {
    for service in SERVICES {
        let doc = raw(service);
        let ports = at(container(&doc), "ports").as_sequence().unwrap();
        assert_eq!(ports.len(), 1, "{service}: one port");
        assert_eq!(
            str_at(&ports[0], "name"),
            "h2c",
            "{service}: end-to-end HTTP/2"
        );
        assert_eq!(int_at(&ports[0], "containerPort"), 8080, "{service}");
    }
}

#[test]
fn no_manifest_sets_names_cloud_run_reserves() {
    for service in SERVICES {
        let names: BTreeSet<_> = env(&raw(service)).into_keys().collect();
        for reserved in ["PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"] {
            assert!(!names.contains(reserved), "{service} sets {reserved}");
        }
    }
}

#[test]
fn startup_and_liveness_probes_ask_the_grpc_health_service_on_8080() {
    for service in SERVICES {
        let doc = raw(service);
        let c = container(&doc);
        for probe in ["startupProbe", "livenessProbe"] {
            let p = at(c, probe);
            assert_eq!(int_at(p, "grpc.port"), 8080, "{service} {probe}");
            assert_eq!(
                str_at(p, "grpc.service"),
                "",
                "{service} {probe}: whole server"
            );
            let (period, timeout) = (int_at(p, "periodSeconds"), int_at(p, "timeoutSeconds"));
            assert!(timeout <= period, "{service} {probe}: timeout over period");
        }
        let startup = at(c, "startupProbe");
        let budget = int_at(startup, "periodSeconds") * int_at(startup, "failureThreshold");
        assert!(
            budget <= 240,
            "{service}: Cloud Run allows at most 240 s to start"
        );
    }
}

#[test]
fn each_service_runs_as_its_own_service_account() {
    let accounts: BTreeSet<_> = SERVICES
        .iter()
        .map(|s| {
            let doc = raw(s);
            let account = str_at(&doc, "spec.template.spec.serviceAccountName").to_string();
            assert_eq!(account, sa(s));
            account
        })
        .collect();
    assert_eq!(accounts.len(), SERVICES.len());
}

#[test]
fn streams_may_last_as_long_as_cloud_run_allows() {
    for service in SERVICES {
        let doc = raw(service);
        let spec = at(&doc, "spec.template.spec");
        assert_eq!(int_at(spec, "timeoutSeconds"), 3600, "{service}");
        let concurrency = int_at(spec, "containerConcurrency");
        assert!(
            (1..=1000).contains(&concurrency),
            "{service}: {concurrency}"
        );
    }
}

#[test]
fn instances_are_gen2_with_bounded_scale_and_resources() {
    for service in SERVICES {
        let doc = raw(service);
        let notes = at(&doc, "spec.template.metadata.annotations");
        let note = |name: &str| key(notes, name);
        assert_eq!(note("autoscaling.knative.dev/minScale"), "${MIN_INSTANCES}");
        let max: u32 = note("autoscaling.knative.dev/maxScale").parse().unwrap();
        assert!((1..=100).contains(&max), "{service}: maxScale {max}");
        assert_eq!(note("run.googleapis.com/startup-cpu-boost"), "true");
        assert_eq!(note("run.googleapis.com/execution-environment"), "gen2");
        let limits = at(container(&doc), "resources.limits");
        assert_eq!(str_at(limits, "cpu"), "1", "{service}");
        let memory = str_at(limits, "memory");
        let mib: u32 = memory.strip_suffix("Mi").unwrap().parse().unwrap();
        assert!(
            mib >= 512,
            "{service}: gen2 needs at least 512Mi, has {memory}"
        );
    }
}

#[test]
fn ingress_is_all_and_the_iam_check_stays_on_for_relay_and_ping() {
    for service in SERVICES {
        let doc = raw(service);
        let notes = at(&doc, "metadata.annotations");
        assert_eq!(key(notes, "run.googleapis.com/ingress"), "all", "{service}");
        let check_off = notes.get("run.googleapis.com/invoker-iam-disabled");
        match service {
            "gateway" => assert_eq!(
                key(notes, "run.googleapis.com/invoker-iam-disabled"),
                "${GATEWAY_IAM_CHECK_OFF}"
            ),
            _ => assert!(
                check_off.is_none(),
                "{service}: IAM is what keeps it private"
            ),
        }
    }
}

#[test]
fn every_service_checks_tokens_minted_for_its_own_url() {
    for service in SERVICES {
        let vars = env(&raw(service));
        // Behind Cloud Run's IAM check the token arrives with its signature removed.
        let mode = match service {
            "gateway" => "${GATEWAY_AUTH_MODE}",
            _ => "cloud-run",
        };
        assert_eq!(vars["AUTH_MODE"], mode, "{service}");
        assert!(
            !vars.contains_key("AUTH_JWKS_URL"),
            "{service}: Google's keys"
        );
        let audiences: Vec<_> = vars["AUTH_AUDIENCE"].split(',').collect();
        let own = format!("${{{}}}", url_placeholder(service));
        let expected = match service {
            "gateway" => vec![own.as_str(), GCLOUD_AUDIENCE],
            _ => vec![own.as_str()],
        };
        assert_eq!(audiences, expected, "{service}");
    }
}

#[test]
fn allow_lists_hold_exactly_the_calling_services_account() {
    let callers = [
        ("ping", sa("relay")),
        ("relay", sa("gateway")),
        ("gateway", "${GATEWAY_ALLOWED_CALLERS}".to_string()),
    ];
    for (service, caller) in callers {
        assert_eq!(
            env(&raw(service))["AUTH_ALLOWED_CALLERS"],
            caller,
            "{service}"
        );
    }
}

#[test]
fn each_hop_forwards_to_the_next_service_with_a_google_id_token() {
    assert!(!env(&raw("ping")).contains_key("UPSTREAM_URL"));
    for (service, next) in [("relay", "ping"), ("gateway", "relay")] {
        let vars = env(&raw(service));
        assert_eq!(
            vars["UPSTREAM_URL"],
            format!("${{{}}}", url_placeholder(next))
        );
        assert_eq!(vars["UPSTREAM_AUTH"], "google", "{service}");
        assert!(
            !vars.contains_key("UPSTREAM_AUDIENCE"),
            "{service}: the default, UPSTREAM_URL's origin, is what {next} accepts"
        );
    }
}

#[test]
fn every_placeholder_is_documented_in_the_header() {
    for service in SERVICES {
        let text = template(service);
        let used = placeholders(&text);
        let documented: BTreeSet<_> = text
            .lines()
            .skip_while(|l| !l.contains("Placeholders below"))
            .skip(2)
            .map_while(|l| l.strip_prefix("#   "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .map(String::from)
            .collect();
        assert_eq!(used, documented, "{service}");
    }
}

#[test]
fn rendered_manifests_hold_real_values_only() {
    for service in SERVICES {
        let doc = rendered(service);
        assert_eq!(
            str_at(&doc, "spec.template.spec.serviceAccountName"),
            format!("{service}-sa@{PROJECT}.iam.gserviceaccount.com")
        );
        for (name, value) in env(&doc) {
            assert!(!value.contains('$'), "{service}: {name}={value}");
        }
    }
}

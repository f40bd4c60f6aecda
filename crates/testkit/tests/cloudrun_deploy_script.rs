//! `deploy/cloudrun/deploy.sh` run against a fake `gcloud` (and `docker`) placed first on
//! `PATH`: the order of the deploys, the URL wiring, the exact invoker bindings, idempotence, and
//! a `--dry-run` that runs nothing.
//!
//! The fake records every call and keeps what it "created" in a state directory, so a second
//! run sees the first one's work; `FAKE_MODE=existing` answers as a project where everything is
//! already in place.

#[path = "cloudrun_support.rs"]
mod support;

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Command, Output},
};

use serde_yaml_ng::Value;
use support::{
    PROJECT, SERVICES, at, container, deploy_dir, env, key, parse, placeholders, str_at,
};

const REGION: &str = "us-central1";
const PROJECT_NUMBER: &str = "123456789";
const ACCOUNT: &str = "dev@example.com";

/// Logs its arguments tab-separated after its own name, and answers from `$FAKE_STATE`.
const FAKE_GCLOUD: &str = r#"#!/usr/bin/env bash
set -euo pipefail
(IFS=$'\t'; printf 'gcloud\t%s\n' "$*") >>"$FAKE_LOG"
state=$FAKE_STATE
existing() { [[ ${FAKE_MODE:-fresh} == existing ]]; }
has() { existing || [[ -e $state/$1 ]]; }
flag() { # flag NAME ARGS...: the value after --NAME
  local name=$1; shift
  while (($#)); do [[ $1 == "--$name" ]] && { printf '%s' "$2"; return; }; shift; done
}
case "$1 $2 ${3:-}" in
"config get-value account") echo dev@example.com ;;
"services list --enabled")
  if existing; then printf '%s\n' run.googleapis.com artifactregistry.googleapis.com \
    cloudbuild.googleapis.com iam.googleapis.com compute.googleapis.com
  else cat "$state/apis" 2>/dev/null || true; fi ;;
"services enable "*) for a in "${@:3}"; do [[ $a == --* ]] && break; echo "$a" >>"$state/apis"; done ;;
"iam service-accounts describe") has "sa-${4%%@*}" ;;
"iam service-accounts create") touch "$state/sa-$4" ;;
"artifacts repositories describe") has "repo-$4" ;;
"artifacts repositories create") touch "$state/repo-$4" ;;
"artifacts docker images") has "image-${5##*/}" ;;
"builds submit "*)
  tag=$(flag substitutions "$@"); tag=${tag##*_TAG=}
  for s in ping relay gateway; do touch "$state/image-$s:$tag"; done ;;
"auth configure-docker "*) ;;
"projects describe "*) echo 123456789 ;;
"run services describe")
  if has "run-$4"; then echo "https://$4-abc-uc.a.run.app"
  else echo "ERROR: Cannot find service [$4]" >&2; exit 1; fi ;;
"run services replace")
  n=$(find "$FAKE_APPLIED" -type f | wc -l)
  cp "$4" "$FAKE_APPLIED/$(printf '%03d' "$n").yaml"
  name=$(sed -n 's/^  name: //p' "$4" | head -1)
  touch "$state/run-$name" ;;
"run services get-iam-policy")
  if [[ -e $state/iam-$4 ]]; then cat "$state/iam-$4"
  elif existing; then
    case $4 in
    ping) echo serviceAccount:relay-sa@demo-project.iam.gserviceaccount.com ;;
    relay) echo serviceAccount:gateway-sa@demo-project.iam.gserviceaccount.com ;;
    gateway) echo user:dev@example.com ;;
    esac
  fi ;;
"run services add-iam-policy-binding") flag member "$@" >>"$state/iam-$4"; echo >>"$state/iam-$4" ;;
"run services remove-iam-policy-binding")
  m=$(flag member "$@"); grep -vxF "$m" "$state/iam-$4" >"$state/iam.tmp" || true
  mv "$state/iam.tmp" "$state/iam-$4" ;;
*) echo "fake gcloud: unexpected call: $*" >&2; exit 2 ;;
esac
"#;

/// Logs its arguments; a push marks the image as present for the fake `gcloud`.
const FAKE_DOCKER: &str = r#"#!/usr/bin/env bash
set -euo pipefail
(IFS=$'\t'; printf 'docker\t%s\n' "$*") >>"$FAKE_LOG"
if [[ $1 == push ]]; then touch "$FAKE_STATE/image-${2##*/}"; fi
"#;

/// One recorded call: the program, then its arguments.
type Call = Vec<String>;

/// A scratch `PATH` directory with the fakes, their log and their state.
struct Fake {
    dir: tempfile::TempDir,
    existing: bool,
}

impl Fake {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["bin", "state", "applied", "tmp"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        for (name, script) in [("gcloud", FAKE_GCLOUD), ("docker", FAKE_DOCKER)] {
            let path = dir.path().join("bin").join(name);
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self {
            dir,
            existing: false,
        }
    }

    /// A fake answering as a project where everything is in place already.
    fn existing() -> Self {
        Self {
            existing: true,
            ..Self::new()
        }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// Puts `content` in the fake's state file `name`, e.g. an invoker list as `iam-relay`.
    fn seed(&self, name: &str, content: &str) {
        fs::write(self.path("state").join(name), content).unwrap();
    }

    /// Runs deploy.sh with the test project and region plus `extra`.
    fn run(&self, extra: &[&str]) -> Output {
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("bash")
            .arg(deploy_dir().join("deploy.sh"))
            .args(["--project", PROJECT, "--region", REGION, "--tag", "test1"])
            .args(extra)
            .env("PATH", path)
            .env("TMPDIR", self.path("tmp"))
            .env("FAKE_LOG", self.path("calls.log"))
            .env("FAKE_STATE", self.path("state"))
            .env("FAKE_APPLIED", self.path("applied"))
            .env(
                "FAKE_MODE",
                if self.existing { "existing" } else { "fresh" },
            )
            .output()
            .expect("bash runs")
    }

    /// Runs deploy.sh and insists it succeeds.
    fn deploy(&self, extra: &[&str]) -> Output {
        let out = self.run(extra);
        assert!(
            out.status.success(),
            "deploy.sh failed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Every call recorded since the last `take_calls`, in order.
    fn take_calls(&self) -> Vec<Call> {
        let log = self.path("calls.log");
        let text = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        text.lines()
            .map(|l| l.split('\t').map(String::from).collect())
            .collect()
    }

    /// Every manifest given to `gcloud run services replace` since the last call, in order,
    /// as (service name, raw text).
    fn take_applied(&self) -> Vec<(String, String)> {
        let dir = self.path("applied");
        let mut files: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|path| {
                let text = fs::read_to_string(&path).unwrap();
                fs::remove_file(&path).unwrap();
                let name = str_at(&parse(&text), "metadata.name").to_string();
                (name, text)
            })
            .collect()
    }
}

fn gcloud<'a>(calls: &'a [Call], prefix: &[&str]) -> Vec<&'a Call> {
    calls
        .iter()
        .filter(|c| c[0] == "gcloud" && c.len() > prefix.len() && c[1..=prefix.len()] == *prefix)
        .collect()
}

/// The value after `--name` in `call`.
fn flag<'a>(call: &'a Call, name: &str) -> &'a str {
    let at = call
        .iter()
        .position(|a| a == &format!("--{name}"))
        .unwrap_or_else(|| panic!("no --{name} in {call:?}"));
    &call[at + 1]
}

/// (service, member) of every invoker binding added, or removed, by `calls`.
fn bindings(calls: &[Call], verb: &str) -> BTreeSet<(String, String)> {
    gcloud(calls, &["run", "services", verb])
        .into_iter()
        .map(|c| {
            assert_eq!(flag(c, "role"), "roles/run.invoker", "{c:?}");
            (c[4].clone(), flag(c, "member").to_string())
        })
        .collect()
}

fn sa(service: &str) -> String {
    format!("serviceAccount:{service}-sa@{PROJECT}.iam.gserviceaccount.com")
}

fn url(service: &str) -> String {
    format!("https://{service}-abc-uc.a.run.app")
}

fn pairs(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The last manifest applied for each service, parsed.
fn last_applied(applied: &[(String, String)], service: &str) -> Value {
    let (_, text) = applied
        .iter()
        .rev()
        .find(|(name, _)| name == service)
        .unwrap_or_else(|| panic!("{service} was never applied"));
    parse(text)
}

/// Calls that create or grant something: what a run against a complete project must not make.
fn creating(calls: &[Call]) -> Vec<&Call> {
    calls
        .iter()
        .filter(|c| {
            c.iter().any(|a| {
                [
                    "create",
                    "enable",
                    "submit",
                    "add-iam-policy-binding",
                    "remove-iam-policy-binding",
                    "push",
                ]
                .contains(&a.as_str())
            })
        })
        .collect()
}

fn services_in_order(applied: &[(String, String)]) -> Vec<&str> {
    let mut order: Vec<&str> = Vec::new();
    for (name, _) in applied {
        if order.last() != Some(&name.as_str()) {
            order.push(name);
        }
    }
    order
}

#[test]
fn dry_run_prints_every_command_and_runs_none() {
    let fake = Fake::new();
    let out = fake.deploy(&["--dry-run"]);
    assert!(
        fake.take_calls().is_empty(),
        "--dry-run called gcloud or docker"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let printed: Vec<_> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[dry-run] "))
        .collect();
    let find = |needle: &str| {
        printed
            .iter()
            .position(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in\n{stdout}"))
    };
    find("gcloud services enable run.googleapis.com");
    for service in SERVICES {
        find(&format!("gcloud iam service-accounts create {service}-sa "));
    }
    find("gcloud artifacts repositories create runmesh ");
    find("gcloud builds submit ");
    let ping = find("gcloud run services replace ");
    let order: Vec<_> = SERVICES
        .iter()
        .map(|s| find(&format!("gcloud run services add-iam-policy-binding {s} ")))
        .collect();
    assert!(ping < order[0] && order[0] < order[1] && order[1] < order[2]);
    assert!(printed.iter().all(|l| l.starts_with("gcloud ")));
}

#[test]
fn first_run_deploys_ping_then_relay_then_gateway() {
    let fake = Fake::new();
    fake.deploy(&[]);
    let applied = fake.take_applied();
    assert_eq!(services_in_order(&applied), SERVICES);
    let calls = fake.take_calls();
    let enabled = gcloud(&calls, &["services", "enable"]);
    assert_eq!(enabled.len(), 1);
    for service in SERVICES {
        let created = gcloud(&calls, &["iam", "service-accounts", "create"]);
        assert!(created.iter().any(|c| c[4] == format!("{service}-sa")));
    }
    assert_eq!(
        gcloud(&calls, &["artifacts", "repositories", "create"]).len(),
        1
    );
    let builds = gcloud(&calls, &["builds", "submit"]);
    assert_eq!(builds.len(), 1);
    assert_eq!(
        flag(builds[0], "substitutions"),
        format!("_IMAGE_BASE={REGION}-docker.pkg.dev/{PROJECT}/runmesh,_TAG=test1")
    );
}

#[test]
fn each_service_gets_its_own_url_as_audience_and_the_next_ones_as_upstream() {
    let fake = Fake::new();
    fake.deploy(&[]);
    let applied = fake.take_applied();
    for (_, text) in &applied {
        assert!(
            placeholders(text).is_empty(),
            "unfilled placeholder in\n{text}"
        );
    }
    let vars = |s| env(&last_applied(&applied, s));
    assert_eq!(vars("ping")["AUTH_AUDIENCE"], url("ping"));
    assert_eq!(vars("relay")["AUTH_AUDIENCE"], url("relay"));
    assert_eq!(
        vars("gateway")["AUTH_AUDIENCE"],
        format!("{},32555940559.apps.googleusercontent.com", url("gateway"))
    );
    assert_eq!(vars("relay")["UPSTREAM_URL"], url("ping"));
    assert_eq!(vars("gateway")["UPSTREAM_URL"], url("relay"));
    assert_eq!(vars("gateway")["AUTH_ALLOWED_CALLERS"], ACCOUNT);
    for service in SERVICES {
        let doc = last_applied(&applied, service);
        assert_eq!(
            str_at(container(&doc), "image"),
            format!("{REGION}-docker.pkg.dev/{PROJECT}/runmesh/{service}:test1")
        );
    }
}

#[test]
fn a_new_service_is_applied_with_the_deterministic_url_then_the_reported_one() {
    let fake = Fake::new();
    fake.deploy(&[]);
    let applied = fake.take_applied();
    let pings: Vec<_> = applied.iter().filter(|(n, _)| n == "ping").collect();
    assert_eq!(
        pings.len(),
        2,
        "applied once with the guess, once corrected"
    );
    let audience = |text: &str| env(&parse(text))["AUTH_AUDIENCE"].clone();
    assert_eq!(
        audience(&pings[0].1),
        format!("https://ping-{PROJECT_NUMBER}.{REGION}.run.app")
    );
    assert_eq!(audience(&pings[1].1), url("ping"));
}

#[test]
fn invokers_are_exactly_each_callers_account() {
    let fake = Fake::new();
    fake.deploy(&[]);
    let calls = fake.take_calls();
    let relay_sa = sa("relay");
    let gateway_sa = sa("gateway");
    let user = format!("user:{ACCOUNT}");
    assert_eq!(
        bindings(&calls, "add-iam-policy-binding"),
        pairs(&[
            ("ping", &relay_sa),
            ("relay", &gateway_sa),
            ("gateway", &user)
        ])
    );
    assert!(bindings(&calls, "remove-iam-policy-binding").is_empty());
    // Each service's bindings are granted after it is deployed, and in deploy order.
    let order: Vec<_> = calls
        .iter()
        .filter(|c| c.get(3).is_some_and(|v| v == "add-iam-policy-binding"))
        .map(|c| c[4].as_str())
        .collect();
    assert_eq!(order, SERVICES);
}

#[test]
fn the_gateway_trusts_cloud_runs_token_check_only_while_it_is_on() {
    let fake = Fake::new();
    fake.deploy(&[]);
    let private = last_applied(&fake.take_applied(), "gateway");
    let check_off = |doc: &Value| {
        key(
            at(doc, "metadata.annotations"),
            "run.googleapis.com/invoker-iam-disabled",
        )
        .to_string()
    };
    assert_eq!(check_off(&private), "false");
    assert_eq!(env(&private)["AUTH_MODE"], "cloud-run");

    fake.deploy(&["--public-gateway"]);
    let public = last_applied(&fake.take_applied(), "gateway");
    assert_eq!(check_off(&public), "true");
    assert_eq!(env(&public)["AUTH_MODE"], "verify");
}

#[test]
fn a_public_gateway_still_admits_only_its_members() {
    let fake = Fake::new();
    let members = "user:alice@example.com,serviceAccount:ci@other.iam.gserviceaccount.com";
    fake.deploy(&["--public-gateway", "--gateway-members", members]);
    let calls = fake.take_calls();
    assert!(
        gcloud(&calls, &["config", "get-value"]).is_empty(),
        "members were given; the logged-in account does not matter"
    );
    let relay_sa = sa("relay");
    let gateway_sa = sa("gateway");
    assert_eq!(
        bindings(&calls, "add-iam-policy-binding"),
        pairs(&[
            ("ping", &relay_sa),
            ("relay", &gateway_sa),
            ("gateway", "user:alice@example.com"),
            ("gateway", "serviceAccount:ci@other.iam.gserviceaccount.com"),
        ]),
        "no allUsers: the IAM check is off instead"
    );
    let applied = fake.take_applied();
    assert_eq!(
        env(&last_applied(&applied, "gateway"))["AUTH_ALLOWED_CALLERS"],
        "alice@example.com,ci@other.iam.gserviceaccount.com"
    );
}

#[test]
fn a_second_run_creates_nothing_and_applies_the_same_manifests() {
    let fake = Fake::new();
    fake.deploy(&[]);
    let first = fake.take_applied();
    fake.take_calls();

    fake.deploy(&[]);
    let calls = fake.take_calls();
    assert_eq!(creating(&calls), Vec::<&Call>::new());
    let second = fake.take_applied();
    assert_eq!(services_in_order(&second), SERVICES);
    assert_eq!(second.len(), 3, "one apply each, the URLs being known");
    for service in SERVICES {
        assert_eq!(
            last_applied(&second, service),
            last_applied(&first, service),
            "{service}"
        );
    }
}

#[test]
fn against_a_complete_project_nothing_is_created() {
    let fake = Fake::existing();
    fake.deploy(&[]);
    let calls = fake.take_calls();
    assert_eq!(creating(&calls), Vec::<&Call>::new());
    assert!(gcloud(&calls, &["projects", "describe"]).is_empty());
    let applied = fake.take_applied();
    assert_eq!(services_in_order(&applied), SERVICES);
    assert_eq!(applied.len(), 3);
    assert_eq!(
        env(&last_applied(&applied, "gateway"))["UPSTREAM_URL"],
        url("relay")
    );
}

#[test]
fn an_invoker_that_should_not_be_there_is_removed() {
    let fake = Fake::existing();
    fake.seed("iam-relay", &format!("allUsers\n{}\n", sa("gateway")));
    fake.deploy(&[]);
    let calls = fake.take_calls();
    assert!(bindings(&calls, "add-iam-policy-binding").is_empty());
    assert_eq!(
        bindings(&calls, "remove-iam-policy-binding"),
        pairs(&[("relay", "allUsers")])
    );
}

#[test]
fn the_docker_builder_builds_and_pushes_each_image() {
    let fake = Fake::new();
    fake.deploy(&["--builder", "docker"]);
    let calls = fake.take_calls();
    assert!(gcloud(&calls, &["builds", "submit"]).is_empty());
    let pushed: Vec<_> = calls
        .iter()
        .filter(|c| c[0] == "docker" && c[1] == "push")
        .map(|c| c[2].as_str())
        .collect();
    let expected: Vec<_> = SERVICES
        .iter()
        .map(|s| format!("{REGION}-docker.pkg.dev/{PROJECT}/runmesh/{s}:test1"))
        .collect();
    assert_eq!(pushed, expected);
    let built = calls.iter().filter(|c| c[0] == "docker" && c[1] == "build");
    for (call, service) in built.zip(SERVICES) {
        assert_eq!(flag(call, "build-arg"), format!("SERVICE={service}"));
        assert_eq!(flag(call, "platform"), "linux/amd64");
    }
}

#[test]
fn group_members_are_refused_before_anything_runs() {
    let fake = Fake::new();
    let out = fake.run(&["--gateway-members", "group:team@example.com"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("group:team@example.com"), "{stderr}");
    assert!(fake.take_calls().is_empty());
}

#[test]
fn project_and_region_are_required() {
    let out = Command::new("bash")
        .arg(deploy_dir().join("deploy.sh"))
        .args(["--region", REGION])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--project is required"));
    let out = Command::new("bash")
        .arg(deploy_dir().join("deploy.sh"))
        .args(["--project", PROJECT])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--region is required"));
}

//! `runmesh up`: the whole mesh on this machine, authenticated at every hop, in one command.
//!
//! The identity server, ping, relay and gateway run in this process on loopback, through the
//! same `serve` functions the service binaries call and the same token code path they use on
//! Cloud Run: each forwarding hop fetches its own ID token from its own emulated metadata
//! server, and each hop verifies its caller against the identity server's JWKS.

use std::{collections::HashMap, sync::Arc, time::Duration};

use clap::Args;
use runmesh_auth::idp::{self, Issuer};
use runmesh_forward::Role;
use runmesh_runtime::{LogFormat, process::check_health, telemetry};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::call::{self, CallArgs, Kind};

/// The service account the gateway calls relay as.
pub(crate) const GATEWAY_SA: &str = "gateway@runmesh-local.iam.gserviceaccount.com";
/// The service account relay calls ping as.
pub(crate) const RELAY_SA: &str = "relay@runmesh-local.iam.gserviceaccount.com";
/// The end user the demo calls are made as.
pub(crate) const USER: &str = "user@example.com";

/// Arguments of `runmesh up`.
#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Gateway port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Port of the identity server's API (JWKS and user tokens).
    #[arg(long, default_value_t = 9000)]
    idp_port: u16,
    /// Stop after the demo calls instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
}

async fn bind(port: u16) -> Result<(TcpListener, String), String> {
    let l = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    Ok((l, format!("http://{addr}")))
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs the mesh; see the module docs.
pub(crate) async fn run(args: UpArgs) -> Result<(), String> {
    telemetry::init_with_default(LogFormat::Text, "warn");
    if std::env::var_os("GCE_METADATA_HOST").is_some() {
        eprintln!("warning: GCE_METADATA_HOST is set and overrides every hop's identity; unset it");
    }
    let issuer = Arc::new(Issuer::generate().map_err(|e| e.to_string())?);
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let (idp_api, idp_url) = bind(args.idp_port).await?;
    let (gateway_md, gateway_md_url) = bind(0).await?;
    let (relay_md, relay_md_url) = bind(0).await?;
    let jwks = format!("{idp_url}/jwks");
    tasks.spawn({
        let identities = vec![
            (GATEWAY_SA.to_string(), gateway_md),
            (RELAY_SA.to_string(), relay_md),
        ];
        let done = stop.clone().cancelled_owned();
        let issuer = issuer.clone();
        async move {
            idp::serve(issuer, idp_api, identities, done)
                .await
                .map_err(|e| e.to_string())
        }
    });

    let (ping_l, ping_url) = bind(0).await?;
    let (relay_l, relay_url) = bind(0).await?;
    let (gateway_l, gateway_url) = bind(args.port).await?;
    let md_host = |url: &str| url.trim_start_matches("http://").to_string();

    let ping = runmesh_ping::Config::from_env(&env(&[
        ("AUTH_AUDIENCE", &ping_url),
        ("AUTH_JWKS_URL", &jwks),
        ("AUTH_ALLOWED_CALLERS", RELAY_SA),
        ("SHUTDOWN_GRACE", "2s"),
    ]))
    .map_err(|e| format!("ping: {e}"))?;
    let relay = runmesh_forward::Config::from_env(
        Role::Relay,
        &env(&[
            ("AUTH_AUDIENCE", &relay_url),
            ("AUTH_JWKS_URL", &jwks),
            ("AUTH_ALLOWED_CALLERS", GATEWAY_SA),
            ("UPSTREAM_URL", &ping_url),
            ("UPSTREAM_AUDIENCE", &ping_url),
            ("GCE_METADATA_HOST", &md_host(&relay_md_url)),
            ("SHUTDOWN_GRACE", "2s"),
        ]),
    )
    .map_err(|e| format!("relay: {e}"))?;
    let gateway = runmesh_forward::Config::from_env(
        Role::Gateway,
        &env(&[
            ("AUTH_AUDIENCE", &gateway_url),
            ("AUTH_JWKS_URL", &jwks),
            ("UPSTREAM_URL", &relay_url),
            ("UPSTREAM_AUDIENCE", &relay_url),
            ("GCE_METADATA_HOST", &md_host(&gateway_md_url)),
            ("SHUTDOWN_GRACE", "2s"),
        ]),
    )
    .map_err(|e| format!("gateway: {e}"))?;

    let done = || stop.clone().cancelled_owned();
    tasks.spawn({
        let done = done();
        async move {
            runmesh_ping::serve(ping, ping_l, done)
                .await
                .map_err(|e| format!("ping: {e}"))
        }
    });
    tasks.spawn({
        let done = done();
        async move {
            runmesh_forward::serve(relay, relay_l, done)
                .await
                .map_err(|e| format!("relay: {e}"))
        }
    });
    tasks.spawn({
        let done = done();
        async move {
            runmesh_forward::serve(gateway, gateway_l, done)
                .await
                .map_err(|e| format!("gateway: {e}"))
        }
    });

    let result = demo(
        &issuer,
        &[&ping_url, &relay_url, &gateway_url],
        &gateway_url,
        &idp_url,
        args.once,
    )
    .await;
    if result.is_ok() && !args.once {
        runmesh_runtime::shutdown_signal().await;
    }
    stop.cancel();
    let shut = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), shut)
        .await
        .is_err()
    {
        eprintln!("some services did not stop within 5 s");
    }
    println!("mesh stopped");
    result
}

async fn demo(
    issuer: &Issuer,
    services: &[&str],
    gateway: &str,
    idp: &str,
    once: bool,
) -> Result<(), String> {
    for url in services {
        let port: u16 = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let ready = async {
            while !matches!(check_health(port, Duration::from_secs(1)).await, Ok(true)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .map_err(|_| format!("{url} did not become SERVING within 10 s"))?;
    }
    println!(
        "mesh up: gateway {gateway} → relay {} → ping {}",
        services[1], services[0]
    );
    let token = issuer.mint(gateway, USER, Duration::from_secs(3600));
    for (name, kind) in [
        ("Send (unary)", Kind::Send),
        ("SendStream (server streaming)", Kind::Stream),
        ("Collect (client streaming)", Kind::Collect),
        ("Chat (bidi streaming)", Kind::Chat),
    ] {
        println!("\n== {name} as {USER}");
        call::run(kind, CallArgs::demo(gateway, &token))
            .await
            .map_err(|e| format!("{name}: {e}"))?;
    }
    println!("\nall four calls went gateway → relay → ping, authenticated at every hop.");
    if !once {
        println!(
            "\nCall the gateway yourself (tokens last an hour):\n  \
             export RUNMESH_TOKEN=$(cargo run -q -p runmesh-cli -- token --idp {idp} --audience {gateway} --email you@example.com)\n  \
             cargo run -q -p runmesh-cli -- send --target {gateway} --message hi\n  \
             cargo run -q -p runmesh-cli -- chat --target {gateway} --count 5 --interval 200ms\n\
             Ctrl-C stops the mesh."
        );
    }
    Ok(())
}

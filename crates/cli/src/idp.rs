//! `runmesh idp` and `runmesh token`: the local identity server and its user tokens.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use clap::Args;
use runmesh_auth::idp::{self, Issuer};
use tokio::net::TcpListener;

/// Arguments of `runmesh idp`.
#[derive(Debug, Args)]
pub(crate) struct IdpArgs {
    /// Where to serve the JWKS (`/jwks`) and user tokens (`/token`).
    #[arg(long, default_value = "127.0.0.1:9000")]
    api: SocketAddr,
    /// A service identity and the address of its emulated metadata server, `EMAIL=HOST:PORT`;
    /// point that service's `GCE_METADATA_HOST` at it.
    #[arg(long = "identity", value_parser = parse_identity)]
    identities: Vec<(String, SocketAddr)>,
    /// RSA private keys (PEM) to sign with, newest last; generated at start when none is given.
    #[arg(long = "key-file")]
    key_files: Vec<PathBuf>,
}

fn parse_identity(s: &str) -> Result<(String, SocketAddr), String> {
    let (email, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected EMAIL=HOST:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{s:?}: bad address {addr:?}: {e}"))?;
    Ok((email.to_string(), addr))
}

/// Arguments of `runmesh token`.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// The local identity server's API address.
    #[arg(long, env = "RUNMESH_IDP", default_value = "http://127.0.0.1:9000")]
    idp: String,
    /// Audience: the URL of the service the token is for (the gateway's).
    #[arg(long)]
    audience: String,
    /// Who the token says you are.
    #[arg(long, default_value = "user@example.com")]
    email: String,
}

/// Runs the local identity server until Ctrl-C or SIGTERM.
pub(crate) async fn serve(args: IdpArgs) -> Result<(), String> {
    let issuer = if args.key_files.is_empty() {
        Issuer::generate()
    } else {
        Issuer::from_pem_files(&args.key_files)
    }
    .map_err(|e| e.to_string())?;
    let api = TcpListener::bind(args.api)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.api))?;
    let api_addr = api.local_addr().map_err(|e| e.to_string())?;
    let mut identities = Vec::new();
    let mut shown = serde_json::Map::new();
    for (email, addr) in args.identities {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} for {email}: {e}"))?;
        let local = l.local_addr().map_err(|e| e.to_string())?;
        shown.insert(email.clone(), local.to_string().into());
        identities.push((email, l));
    }
    // One line for people and scripts alike: where everything ended up (ports may be 0).
    println!(
        "{}",
        serde_json::json!({
            "api": format!("http://{api_addr}"),
            "jwks": format!("http://{api_addr}/jwks"),
            "identities": shown,
        })
    );
    idp::serve(
        Arc::new(issuer),
        api,
        identities,
        runmesh_runtime::shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())
}

/// Prints a user token from a running identity server.
pub(crate) async fn token(args: TokenArgs) -> Result<(), String> {
    let url = format!("{}/token", args.idp.trim_end_matches('/'));
    let res = reqwest::Client::new()
        .get(&url)
        .query(&[("audience", &args.audience), ("email", &args.email)])
        .send()
        .await
        .map_err(|e| format!("cannot reach the identity server at {}: {e}", args.idp))?;
    if !res.status().is_success() {
        return Err(format!("identity server answered {}", res.status()));
    }
    let token = res.text().await.map_err(|e| e.to_string())?;
    println!("{}", token.trim());
    Ok(())
}

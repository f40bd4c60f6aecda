//! `runmesh`: call any runmesh service, mint local tokens, run the local identity server, or
//! bring the whole mesh up on this machine.

mod bench;
mod call;
mod idp;
mod output;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "runmesh",
    version,
    about = "gRPC mesh for Cloud Run: gateway → relay → ping"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One ping, one pong (unary `Send`).
    Send(call::CallArgs),
    /// `--count` pongs, `--interval` apart (server streaming `SendStream`); count 0 is endless.
    Stream(call::CallArgs),
    /// Sends `--count` pings and prints the summary (client streaming `Collect`).
    Collect(call::CallArgs),
    /// Sends `--count` pings, printing each pong as it arrives (bidi `Chat`).
    Chat(call::CallArgs),
    /// Prints an end-user ID token from a running local identity server.
    Token(idp::TokenArgs),
    /// Runs the local identity server (metadata-server emulation, JWKS, user tokens).
    Idp(idp::IdpArgs),
    /// Starts identity server, ping, relay and gateway here, shows a chained call of each type,
    /// and serves until Ctrl-C.
    Up(up::UpArgs),
    /// Loads a service with calls and reports throughput, latency percentiles and errors.
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    runmesh_auth::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Send(args) => call::run(call::Kind::Send, args).await,
        Command::Stream(args) => call::run(call::Kind::Stream, args).await,
        Command::Collect(args) => call::run(call::Kind::Collect, args).await,
        Command::Chat(args) => call::run(call::Kind::Chat, args).await,
        Command::Token(args) => idp::token(args).await,
        Command::Idp(args) => idp::serve(args).await,
        Command::Up(args) => up::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

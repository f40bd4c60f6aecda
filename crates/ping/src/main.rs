//! The `ping` binary: config from the environment, then [`runmesh_ping::serve`] until SIGTERM.

use std::process::ExitCode;

fn main() -> ExitCode {
    runmesh_runtime::run("ping", runmesh_ping::Config::from_env, runmesh_ping::serve)
}

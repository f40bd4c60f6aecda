//! The `gateway` binary: config from the environment, then [`runmesh_forward::serve`] until SIGTERM.

use std::process::ExitCode;

use runmesh_forward::{Config, Role};

fn main() -> ExitCode {
    runmesh_runtime::run(
        "gateway",
        |env| Config::from_env(Role::Gateway, env),
        runmesh_forward::serve,
    )
}

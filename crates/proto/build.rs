//! Compiles `protos/` with protox (pure Rust), so building needs no system `protoc`.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../protos");
    let proto = root.join("runmesh/ping/v1/ping.proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let fds = protox::compile([&proto], [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Reflection serves this exact set, so clients see the same schema the code was built from.
    std::fs::write(
        out.join("runmesh_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

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
    raw_service(&out.join("raw"))?;
    Ok(())
}

/// `PingService` again, every message left encoded ([`runmesh_proto::raw`]): what hops serve.
fn raw_service(out: &std::path::Path) -> std::io::Result<()> {
    use tonic_build::manual::{Builder, Method, Service};
    std::fs::create_dir_all(out)?;
    let method = |name: &str, route: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type("crate::raw::Raw")
            .output_type("crate::raw::Raw")
            .codec_path("crate::raw::RawCodec")
    };
    let service = Service::builder()
        .name("PingService")
        .package("runmesh.ping.v1")
        .method(method("send", "Send").build())
        .method(
            method("send_stream", "SendStream")
                .server_streaming()
                .build(),
        )
        .method(method("collect", "Collect").client_streaming().build())
        .method(
            method("chat", "Chat")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    // Hops serve these; they call upstream with their own client (`runmesh-forward`).
    Builder::new()
        .build_client(false)
        .out_dir(out)
        .compile(&[service]);
    Ok(())
}

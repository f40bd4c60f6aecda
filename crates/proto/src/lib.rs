//! The `runmesh.ping.v1` API, generated from `protos/` at build time.
//!
//! Re-exports the exact `tonic` and `prost` versions the code was generated for, so every crate
//! in the workspace stays in step with them. [`raw`] is the messages left encoded, as the
//! forwarding hops pass them on.

pub use prost;
pub use prost_types;
pub use tonic;

/// `runmesh.ping.v1`: the messages and the `PingService` client and server.
pub mod ping {
    /// Version 1 of the ping API.
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("runmesh.ping.v1");
    }
}

pub mod raw;

/// Encoded `FileDescriptorSet` of the API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/runmesh_descriptor.bin"));

/// Full name of the service, as reflection and health report it.
pub const PING_SERVICE_NAME: &str = "runmesh.ping.v1.PingService";

/// The HTTP/2 path of each method of `PingService`, for code that calls or serves it without the
/// generated client and server (the hops, `runmesh bench`).
pub mod path {
    /// Unary `Send`.
    pub const SEND: &str = "/runmesh.ping.v1.PingService/Send";
    /// Server-streaming `SendStream`.
    pub const SEND_STREAM: &str = "/runmesh.ping.v1.PingService/SendStream";
    /// Client-streaming `Collect`.
    pub const COLLECT: &str = "/runmesh.ping.v1.PingService/Collect";
    /// Bidi `Chat`.
    pub const CHAT: &str = "/runmesh.ping.v1.PingService/Chat";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_is_a_method_of_the_service() {
        let service = format!("/{PING_SERVICE_NAME}/");
        let paths = [
            (path::SEND, "Send"),
            (path::SEND_STREAM, "SendStream"),
            (path::COLLECT, "Collect"),
            (path::CHAT, "Chat"),
        ];
        for (path, method) in paths {
            assert_eq!(path.strip_prefix(&service), Some(method));
        }
    }
}

//! Malformed gRPC frames and HTTP/2 junk, sent with a raw client, get errors, not panics.
//!
//! Each test starts a real ping process (auth off, so the junk reaches the gRPC layer, not the
//! token check), hits it with one kind of hostile input through the `h2` crate or as raw bytes
//! on a TCP socket, asserts the answer is a gRPC error status or a connection-level error, and
//! then that ping still answers a normal call and never printed a panic. A hop reads gRPC's
//! framing itself (`runmesh-forward`), not through tonic as ping does, so every check of the
//! framing is made of a relay in front of a ping as well, and must get the same answer.

use std::{
    io::Cursor,
    time::{Duration, Instant},
};

use runmesh_proto::{
    ping::v1::SendRequest,
    prost::Message,
    tonic::{Code, Request},
};
use runmesh_testkit::{H2Client, Service};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// Every exchange in this file ends within this, or the test fails.
const BOUND: Duration = Duration::from_secs(5);
/// ping's `MAX_MESSAGE_SIZE` here: small, so oversize is cheap to send.
const MAX_MESSAGE: usize = 4096;
/// ping's `MAX_CONCURRENT_STREAMS` here: small, so a flood crosses it.
const MAX_STREAMS: u32 = 32;
const SEND: &str = "/runmesh.ping.v1.PingService/Send";
const COLLECT: &str = "/runmesh.ping.v1.PingService/Collect";
const CHAT: &str = "/runmesh.ping.v1.PingService/Chat";

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn ping() -> Service {
    Service::start(
        "ping",
        &[
            ("AUTH_MODE", "off".into()),
            ("MAX_MESSAGE_SIZE", MAX_MESSAGE.to_string()),
            ("MAX_CONCURRENT_STREAMS", MAX_STREAMS.to_string()),
        ],
    )
    .await
}

/// Where a framing check is sent: ping itself, or a relay in front of one.
struct Target {
    service: Service,
    /// The relay's upstream, kept running as long as the relay.
    _ping: Option<Service>,
}

/// ping, and a relay (same limits, auth off) in front of another ping.
async fn ping_and_relay() -> [Target; 2] {
    let upstream = ping().await;
    let relay = Service::start(
        "relay",
        &[
            ("AUTH_MODE", "off".into()),
            ("UPSTREAM_AUTH", "off".into()),
            (
                "UPSTREAM_URL",
                format!("http://127.0.0.1:{}", upstream.port),
            ),
            ("MAX_MESSAGE_SIZE", MAX_MESSAGE.to_string()),
        ],
    )
    .await;
    [
        Target {
            service: ping().await,
            _ping: None,
        },
        Target {
            service: relay,
            _ping: Some(upstream),
        },
    ]
}

/// After the junk: a normal call still succeeds and nothing panicked.
async fn assert_still_serving(service: &Service) {
    let request = Request::new(SendRequest {
        message: "still there?".into(),
        payload: vec![],
    });
    let pong = timeout(BOUND, async { service.client().await.send(request).await })
        .await
        .expect("a normal call after the junk timed out")
        .expect("a normal call after the junk failed")
        .into_inner()
        .pong
        .expect("pong");
    assert_eq!(pong.message, "still there?");
    assert!(
        !service.proc.panicked(),
        "ping panicked:\n{}",
        service.proc.lines().join("\n")
    );
}

/// A gRPC length-prefixed message: compressed flag, 4-byte big-endian length, bytes.
fn grpc_frame(compressed: bool, claimed_len: u32, bytes: &[u8]) -> Vec<u8> {
    let mut frame = vec![u8::from(compressed)];
    frame.extend_from_slice(&claimed_len.to_be_bytes());
    frame.extend_from_slice(bytes);
    frame
}

fn send_request_bytes(message: &str) -> Vec<u8> {
    SendRequest {
        message: message.into(),
        payload: vec![],
    }
    .encode_to_vec()
}

/// How a raw call ended.
#[derive(Debug)]
enum Outcome {
    /// A gRPC status (from response headers or trailers) with its message and HTTP status.
    Grpc {
        http: u16,
        code: Code,
        message: String,
    },
    /// An HTTP response without `grpc-status`.
    Http(u16),
    /// The stream or connection was reset / closed, and why.
    Reset(#[expect(dead_code, reason = "read through Debug in assertion messages")] String),
}

impl Outcome {
    fn code(&self) -> Option<Code> {
        match self {
            Outcome::Grpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<(Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Some((Code::from_i32(code), message))
}

/// Sends one request over `client` with `headers` and `body`, reads the whole answer.
async fn call(client: &H2Client, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Outcome {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1{path}"))
        .header("te", "trailers");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(()).expect("request");
    let exchange = async {
        let mut client = client.clone().ready().await.map_err(|e| e.to_string())?;
        let (response, mut stream) = client
            .send_request(request, false)
            .map_err(|e| e.to_string())?;
        stream
            .send_data(Cursor::new(body), true)
            .map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        let http = response.status().as_u16();
        if let Some((code, message)) = grpc_status(response.headers()) {
            return Ok(Outcome::Grpc {
                http,
                code,
                message,
            });
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.map_err(|e| e.to_string())?;
        Ok(match trailers.as_ref().and_then(grpc_status) {
            Some((code, message)) => Outcome::Grpc {
                http,
                code,
                message,
            },
            None => Outcome::Http(http),
        })
    };
    match timeout(BOUND, exchange).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(reset)) => Outcome::Reset(reset),
        Err(_) => panic!("no answer to {path} within {BOUND:?}"),
    }
}

/// A gRPC call over `h2` with the usual headers.
async fn grpc_call(client: &H2Client, path: &str, body: Vec<u8>) -> Outcome {
    call(client, path, &[("content-type", "application/grpc")], body).await
}

#[tokio::test]
async fn a_valid_raw_call_is_answered_ok() {
    // The raw client itself is sound: the same path with a well-formed frame succeeds.
    for Target { service, .. } in &ping_and_relay().await {
        let client = service.h2_client().await;
        let message = send_request_bytes("raw");
        let body = grpc_frame(false, message.len() as u32, &message);
        let outcome = grpc_call(&client, SEND, body).await;
        assert_eq!(outcome.code(), Some(Code::Ok), "{outcome:?}");
        assert_still_serving(service).await;
    }
}

#[tokio::test]
async fn a_length_prefix_longer_than_the_body_is_internal() {
    for Target { service, .. } in &ping_and_relay().await {
        let client = service.h2_client().await;
        let message = send_request_bytes("short");
        let body = grpc_frame(false, message.len() as u32 + 100, &message);
        let outcome = grpc_call(&client, SEND, body).await;
        assert_eq!(outcome.code(), Some(Code::Internal), "{outcome:?}");
        // A frame cut inside its 5-byte prefix.
        let outcome = grpc_call(&client, SEND, vec![0, 0, 0]).await;
        assert_eq!(outcome.code(), Some(Code::Internal), "{outcome:?}");
        assert_still_serving(service).await;
    }
}

#[tokio::test]
async fn a_compressed_frame_without_grpc_encoding_is_internal() {
    for Target { service, .. } in &ping_and_relay().await {
        let client = service.h2_client().await;
        let message = send_request_bytes("squeezed");
        let body = grpc_frame(true, message.len() as u32, &message);
        let outcome = grpc_call(&client, SEND, body).await;
        assert_eq!(outcome.code(), Some(Code::Internal), "{outcome:?}");
        // An unknown compression flag value is refused the same way.
        let mut body = grpc_frame(false, message.len() as u32, &message);
        body[0] = 7;
        let outcome = grpc_call(&client, SEND, body).await;
        assert_eq!(outcome.code(), Some(Code::Internal), "{outcome:?}");
        assert_still_serving(service).await;
    }
}

#[tokio::test]
async fn a_broken_frame_inside_a_request_stream_is_internal() {
    // Good messages first: the hop has already passed them on when the broken one arrives, and
    // must fail the call rather than let upstream see a clean end of the stream.
    for Target { service, .. } in &ping_and_relay().await {
        let client = service.h2_client().await;
        let message = send_request_bytes("fine");
        let mut body = grpc_frame(false, message.len() as u32, &message);
        body.extend(grpc_frame(false, message.len() as u32, &message));
        body.extend(grpc_frame(true, message.len() as u32, &message));
        for path in [COLLECT, CHAT] {
            let outcome = grpc_call(&client, path, body.clone()).await;
            assert_eq!(outcome.code(), Some(Code::Internal), "{path}: {outcome:?}");
        }
        // Cut inside a message: the stream's end is not a clean half-close either.
        let mut body = grpc_frame(false, message.len() as u32, &message);
        body.extend(grpc_frame(false, 100, &message));
        for path in [COLLECT, CHAT] {
            let outcome = grpc_call(&client, path, body.clone()).await;
            assert_eq!(outcome.code(), Some(Code::Internal), "{path}: {outcome:?}");
        }
        assert_still_serving(service).await;
    }
}

#[tokio::test]
async fn an_unsupported_grpc_encoding_is_unimplemented() {
    for Target { service, .. } in &ping_and_relay().await {
        let client = service.h2_client().await;
        let message = send_request_bytes("zipped");
        let body = grpc_frame(true, message.len() as u32, &message);
        let headers = [
            ("content-type", "application/grpc"),
            ("grpc-encoding", "snappy-but-not-really"),
        ];
        let outcome = call(&client, SEND, &headers, body).await;
        assert_eq!(outcome.code(), Some(Code::Unimplemented), "{outcome:?}");
        assert_still_serving(service).await;
    }
}

#[tokio::test]
async fn a_length_prefix_over_the_message_limit_is_resource_exhausted() {
    for Target { service, .. } in &ping_and_relay().await {
        let client = service.h2_client().await;
        // Claims 4 GiB, sends a few bytes: refused on the prefix alone, nothing buffered.
        let outcome = grpc_call(&client, SEND, grpc_frame(false, u32::MAX, b"tiny")).await;
        assert_eq!(outcome.code(), Some(Code::ResourceExhausted), "{outcome:?}");
        let Outcome::Grpc { message, .. } = &outcome else {
            unreachable!()
        };
        assert!(
            message.contains(&MAX_MESSAGE.to_string()),
            "names the limit: {message}"
        );
        // One byte over the limit, all of it sent.
        let payload = vec![b'x'; MAX_MESSAGE + 1];
        let outcome = grpc_call(
            &client,
            SEND,
            grpc_frame(false, payload.len() as u32, &payload),
        )
        .await;
        assert_eq!(outcome.code(), Some(Code::ResourceExhausted), "{outcome:?}");
        assert_still_serving(service).await;
    }
}

#[tokio::test]
async fn garbage_protobuf_is_internal() {
    let service = ping().await;
    let client = service.h2_client().await;
    let garbage: [&[u8]; 4] = [
        // Field 1, length-delimited, length far past the end.
        &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        // A varint that never ends.
        &[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
        // Field 1 (a string) holding invalid UTF-8.
        &[0x0a, 0x02, 0xc3, 0x28],
        // Wire type 7 does not exist.
        &[0x0f],
    ];
    for bytes in garbage {
        let outcome = grpc_call(&client, SEND, grpc_frame(false, bytes.len() as u32, bytes)).await;
        assert_eq!(
            outcome.code(),
            Some(Code::Internal),
            "{bytes:02x?}: {outcome:?}"
        );
    }
    // Pseudo-random bytes (fixed seed): never a success that echoes them, never a hang.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..50 {
        let len = 1 + (rng.next() % 200) as usize;
        let bytes = rng.bytes(len);
        let outcome = grpc_call(&client, SEND, grpc_frame(false, bytes.len() as u32, &bytes)).await;
        assert!(
            matches!(outcome.code(), Some(Code::Ok | Code::Internal)),
            "{bytes:02x?}: {outcome:?}"
        );
    }
    assert_still_serving(&service).await;
}

/// A hop passes messages on unread, so a request it cannot decode is ping's to refuse: the
/// caller gets ping's `INTERNAL`, and the hop keeps serving.
#[tokio::test]
async fn garbage_protobuf_through_a_relay_is_internal_from_ping() {
    let ping = ping().await;
    let relay = Service::start(
        "relay",
        &[
            ("AUTH_MODE", "off".into()),
            ("UPSTREAM_AUTH", "off".into()),
            ("UPSTREAM_URL", format!("http://127.0.0.1:{}", ping.port)),
            ("MAX_MESSAGE_SIZE", MAX_MESSAGE.to_string()),
        ],
    )
    .await;
    let client = relay.h2_client().await;
    let garbage: &[u8] = &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f];
    let outcome = grpc_call(
        &client,
        SEND,
        grpc_frame(false, garbage.len() as u32, garbage),
    )
    .await;
    match &outcome {
        Outcome::Grpc { code, message, .. } => {
            assert_eq!(*code, Code::Internal, "{outcome:?}");
            assert!(message.contains("decode"), "{outcome:?}");
        }
        _ => panic!("no gRPC status: {outcome:?}"),
    }
    assert_still_serving(&relay).await;
}

#[tokio::test]
async fn a_non_grpc_content_type_is_refused() {
    // gRPC over HTTP/2: "If Content-Type does not begin with application/grpc, gRPC servers
    // SHOULD respond with HTTP status of 415 (Unsupported Media Type)". grpc-go does.
    let service = ping().await;
    let client = service.h2_client().await;
    let message = send_request_bytes("json?");
    for content_type in ["application/json", "text/plain"] {
        let body = grpc_frame(false, message.len() as u32, &message);
        let outcome = call(&client, SEND, &[("content-type", content_type)], body).await;
        let refused = match &outcome {
            Outcome::Http(status) => *status == 415,
            Outcome::Grpc { http, code, .. } => *http == 415 || *code != Code::Ok,
            Outcome::Reset(_) => true,
        };
        assert!(refused, "content-type {content_type}: {outcome:?}");
    }
    // No content-type at all.
    let body = grpc_frame(false, message.len() as u32, &message);
    let outcome = call(&client, SEND, &[], body).await;
    assert!(
        !matches!(outcome.code(), Some(Code::Ok)),
        "no content-type: {outcome:?}"
    );
    assert_still_serving(&service).await;
}

#[tokio::test]
async fn an_unknown_method_or_service_is_unimplemented() {
    for Target { service, .. } in &ping_and_relay().await {
        let client = service.h2_client().await;
        let message = send_request_bytes("who?");
        for path in [
            "/runmesh.ping.v1.PingService/Nope",
            "/runmesh.ping.v9.PingService/Send",
            "/",
            "/a/b/c",
            "/%00%ff",
        ] {
            let body = grpc_frame(false, message.len() as u32, &message);
            let outcome = grpc_call(&client, path, body).await;
            assert_eq!(
                outcome.code(),
                Some(Code::Unimplemented),
                "{path}: {outcome:?}"
            );
        }
        assert_still_serving(service).await;
    }
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// An HPACK literal header field without indexing, its name from the static table.
fn hpack_literal(name_index: u8, value: &str) -> Vec<u8> {
    assert!(name_index < 15 && value.len() < 127);
    let mut field = vec![name_index, value.len() as u8];
    field.extend_from_slice(value.as_bytes());
    field
}

/// A request header block (no dynamic table, no Huffman), with or without `:path`.
fn request_headers(port: u16, path: Option<&str>) -> Vec<u8> {
    // :method POST and :scheme http, both fully indexed in the static table.
    let mut block = vec![0x83, 0x86];
    if let Some(path) = path {
        block.extend(hpack_literal(4, path)); // :path
    }
    block.extend(hpack_literal(1, &format!("127.0.0.1:{port}"))); // :authority
    // content-type (static index 31: 4-bit prefix 15, then 16).
    block.extend([0x0f, 0x10, 16]);
    block.extend_from_slice(b"application/grpc");
    block.extend([0x00, 2]);
    block.extend_from_slice(b"te");
    block.push(8);
    block.extend_from_slice(b"trailers");
    block
}

/// What the server sent on a raw connection until it closed it or went quiet.
#[derive(Debug, Default)]
struct Seen {
    /// `(type, flags, stream)` of each frame, in order.
    frames: Vec<(u8, u8, u32)>,
    /// Error codes of the GOAWAY frames.
    goaway: Vec<u32>,
    /// Whether the server closed the connection.
    closed: bool,
    /// `(identifier, value)` of each setting the server announced.
    settings: Vec<(u16, u32)>,
}

impl Seen {
    fn has(&self, kind: u8, stream: Option<u32>) -> bool {
        self.frames
            .iter()
            .any(|(k, _, s)| *k == kind && stream.is_none_or(|want| want == *s))
    }
}

/// Reads frames (or anything) until the server closes, `stop` says enough, or `quiet` passes
/// without a byte.
async fn read_frames(tcp: &mut TcpStream, quiet: Duration, stop: impl Fn(&Seen) -> bool) -> Seen {
    let started = Instant::now();
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while started.elapsed() < BOUND && !stop(&seen) {
        match timeout(quiet, tcp.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                seen.closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            seen.frames.push((buf[3], buf[4], stream));
            if buf[3] == GOAWAY && len >= 8 {
                seen.goaway
                    .push(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]));
            }
            if buf[3] == SETTINGS && buf[4] & ACK == 0 {
                for setting in buf[9..9 + len].chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    let value =
                        u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                    seen.settings.push((id, value));
                }
            }
            buf.drain(..9 + len);
        }
    }
    seen
}

/// A raw TCP connection that has sent the client preface and an empty SETTINGS frame.
async fn raw_h2(service: &Service) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", service.port))
        .await
        .expect("connect");
    tcp.write_all(PREFACE).await.expect("preface");
    tcp.write_all(&h2_frame(SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    tcp
}

#[tokio::test]
async fn the_server_takes_data_frames_of_up_to_64_kib() {
    // Not hostile: a peer's ~32 KiB batch of messages may come as one frame, not two or three
    // of HTTP/2's default 16 KiB (`runtime::serve::MAX_FRAME_SIZE`).
    let service = ping().await;
    let mut tcp = raw_h2(&service).await;
    let seen = read_frames(&mut tcp, Duration::from_millis(500), |s| {
        s.has(SETTINGS, Some(0)) && !s.settings.is_empty()
    })
    .await;
    assert!(
        seen.settings.contains(&(SETTINGS_MAX_FRAME_SIZE, 64 << 10)),
        "{:?}",
        seen.settings
    );
}

#[tokio::test]
async fn a_request_without_path_is_a_stream_error() {
    let service = ping().await;
    let mut tcp = raw_h2(&service).await;
    let block = request_headers(service.port, None);
    tcp.write_all(&h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
        .await
        .expect("headers");
    let seen = read_frames(&mut tcp, BOUND, |s| {
        s.has(RST_STREAM, Some(1)) || s.has(GOAWAY, None)
    })
    .await;
    assert!(
        seen.has(RST_STREAM, Some(1)) || seen.has(GOAWAY, None) || seen.closed,
        "no error for a request without :path: {seen:?}"
    );
    // The same connection's next, well-formed stream is not what this test is about; the
    // service answering a fresh client is.
    assert_still_serving(&service).await;
}

#[tokio::test]
async fn a_bad_preface_or_random_bytes_close_the_connection() {
    let service = ping().await;
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut junk: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec(),
        // A valid preface followed by a frame too large for the default SETTINGS.
        [PREFACE, &h2_frame(HEADERS, END_HEADERS, 1, &[0u8; 70_000])].concat(),
        // A valid preface followed by a DATA frame on stream 0.
        [
            PREFACE,
            &h2_frame(SETTINGS, 0, 0, &[]),
            &h2_frame(0x0, 0, 0, b"data"),
        ]
        .concat(),
    ];
    for _ in 0..8 {
        let len = 24 + (rng.next() % 1000) as usize;
        let mut bytes = rng.bytes(len);
        bytes[0] = b'X'; // never the preface by chance
        junk.push(bytes);
    }
    for bytes in &junk {
        let mut tcp = TcpStream::connect(("127.0.0.1", service.port))
            .await
            .expect("connect");
        // The server may close while we are still writing; that is an answer too.
        let _ = tcp.write_all(bytes).await;
        let seen = read_frames(&mut tcp, BOUND, |_| false).await;
        assert!(
            seen.closed,
            "connection left open after {} junk bytes {:02x?}…: {seen:?}",
            bytes.len(),
            &bytes[..bytes.len().min(16)]
        );
    }
    assert_still_serving(&service).await;
}

#[tokio::test]
async fn a_headers_flood_is_refused_past_the_stream_limit() {
    // Streams opened and never finished, far past MAX_CONCURRENT_STREAMS, written without
    // reading a byte: streams past the limit are refused (REFUSED_STREAM) or the connection
    // goes away; the process stays up.
    let service = ping().await;
    let mut tcp = raw_h2(&service).await;
    let block = request_headers(service.port, Some(SEND));
    let flood: Vec<u8> = (0..2000u32)
        .flat_map(|i| h2_frame(HEADERS, END_HEADERS, 2 * i + 1, &block))
        .collect();
    let _ = timeout(BOUND, tcp.write_all(&flood)).await;
    let seen = read_frames(&mut tcp, Duration::from_secs(1), |s| {
        s.has(RST_STREAM, None) || s.has(GOAWAY, None)
    })
    .await;
    assert!(
        seen.has(RST_STREAM, None) || seen.has(GOAWAY, None) || seen.closed,
        "no stream was refused past the limit of {MAX_STREAMS}: {seen:?}"
    );
    drop(tcp);
    assert_still_serving(&service).await;
}

#[tokio::test]
async fn a_rapid_reset_flood_leaves_the_service_serving() {
    // CVE-2023-44487: open a stream, reset it at once, repeat. h2 caps reset streams awaiting
    // accept and answers GOAWAY(ENHANCE_YOUR_CALM); the process stays up for other clients.
    let service = ping().await;
    let mut tcp = raw_h2(&service).await;
    let block = request_headers(service.port, Some(SEND));
    let cancel = 0x8u32.to_be_bytes();
    let flood: Vec<u8> = (0..5000u32)
        .flat_map(|i| {
            let stream = 2 * i + 1;
            [
                h2_frame(HEADERS, END_HEADERS, stream, &block),
                h2_frame(RST_STREAM, 0, stream, &cancel),
            ]
            .concat()
        })
        .collect();
    let _ = timeout(BOUND, tcp.write_all(&flood)).await;
    let seen = read_frames(&mut tcp, Duration::from_secs(1), |s| s.has(GOAWAY, None)).await;
    assert!(
        seen.goaway.contains(&ENHANCE_YOUR_CALM) || seen.closed,
        "5000 reset streams were not answered with GOAWAY(ENHANCE_YOUR_CALM): {seen:?}"
    );
    drop(tcp);
    // The same through the h2 crate, as a well-behaved client library would send it.
    let client = service.h2_client().await;
    for _ in 0..1000 {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1{SEND}"))
            .header("content-type", "application/grpc")
            .body(())
            .expect("request");
        let Ok(Ok(mut ready)) = timeout(BOUND, client.clone().ready()).await else {
            break; // the server hung up: a connection-level answer
        };
        let Ok((_, mut stream)) = ready.send_request(request, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
    }
    assert_still_serving(&service).await;
}

/// A fixed-seed xorshift64 generator, so "random" input is the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

//! `PingService` as the load generator calls it: each request encoded once for the whole run,
//! each answer read only as far as its position.
//!
//! A load generator shares the machine with what it loads, so what it spends per call is taken
//! from the services it measures. Decoding a whole `Pong` copies its payload out and checks
//! and allocates every hop's strings: through the chain that was 45 % of the client's CPU per
//! streamed 1 KiB message (perf, `docs/profiling.md`). h2load reads no answer at all; this
//! still checks that every answer is a well-formed `SendResponse` (protobuf's wire format,
//! every skipped field's length) and that a stream's answers come in order.

use futures::Stream;
use prost::Message;
use runmesh_proto::{
    path::{CHAT, SEND, SEND_STREAM},
    raw::Raw,
};
use tonic::{
    Request, Status, Streaming,
    client::Grpc,
    codec::{Codec, EncodeBuf, Encoder},
    codegen::{StdError, http::uri::PathAndQuery},
};
use tonic_prost::ProstDecoder;

use super::Connection;

/// The largest message either way: the benchmark's payloads, not a policy.
const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// What the bench reads of a `SendResponse`: `pong.index`. Every other field is skipped
/// unread, as prost skips fields a message does not declare.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Answer {
    /// `SendResponse.pong`.
    #[prost(message, optional, tag = "1")]
    pong: Option<Position>,
}

/// `Pong.index` alone.
#[derive(Clone, PartialEq, Message)]
struct Position {
    #[prost(int32, tag = "1")]
    index: i32,
}

impl Answer {
    /// The answer's position in its stream (0 for `Send`).
    pub(crate) fn index(&self) -> i32 {
        self.pong.as_ref().map_or(0, |p| p.index)
    }
}

/// Writes requests as they were encoded; reads answers as [`Answer`]s.
#[derive(Debug, Default)]
struct AnswerCodec;

impl Codec for AnswerCodec {
    type Encode = Raw;
    type Decode = Answer;
    type Encoder = WriteEncoded;
    type Decoder = ProstDecoder<Answer>;

    fn encoder(&mut self) -> WriteEncoded {
        WriteEncoded
    }

    fn decoder(&mut self) -> ProstDecoder<Answer> {
        ProstDecoder::default()
    }
}

#[derive(Debug)]
struct WriteEncoded;

impl Encoder for WriteEncoded {
    type Item = Raw;
    type Error = Status;

    fn encode(&mut self, item: Raw, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write(dst);
        Ok(())
    }
}

/// The three methods the bench calls, on one connection.
#[derive(Debug, Clone)]
pub(crate) struct Client(Grpc<Connection>);

impl Client {
    pub(crate) fn new(connection: Connection) -> Self {
        Self(
            Grpc::new(connection)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
    }

    /// `Send`.
    pub(crate) async fn send(&mut self, request: Request<Raw>) -> Result<Answer, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(SEND);
        Ok(self.0.unary(request, path, AnswerCodec).await?.into_inner())
    }

    /// `SendStream`: the answers as they arrive.
    pub(crate) async fn send_stream(
        &mut self,
        request: Request<Raw>,
    ) -> Result<Streaming<Answer>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(SEND_STREAM);
        let response = self.0.server_streaming(request, path, AnswerCodec).await?;
        Ok(response.into_inner())
    }

    /// `Chat`: pings as `request` yields them, the answers as they arrive.
    pub(crate) async fn chat(
        &mut self,
        request: Request<impl Stream<Item = Raw> + Send + 'static>,
    ) -> Result<Streaming<Answer>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(CHAT);
        let response = self.0.streaming(request, path, AnswerCodec).await?;
        Ok(response.into_inner())
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.0.ready().await.map_err(|e| {
            let e: StdError = e.into();
            Status::unknown(format!("the connection is not ready: {e}"))
        })
    }
}

/// Checks that the answer at `position` of a stream says so.
pub(crate) fn in_order(answer: &Answer, position: u32) -> Result<(), Status> {
    if i64::from(answer.index()) == i64::from(position) {
        Ok(())
    } else {
        Err(Status::internal(format!(
            "answer {position} of the stream came with index {}",
            answer.index()
        )))
    }
}

#[cfg(test)]
mod tests {
    use runmesh_proto::ping::v1::{Hop, Pong, SendResponse};

    use super::*;

    fn answer(index: i32) -> SendResponse {
        SendResponse {
            pong: Some(Pong {
                index,
                message: "bench".into(),
                received_on: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 2,
                }),
                payload: vec![0x5a; 1024],
                hops: vec![Hop {
                    service: "relay".into(),
                    instance: "i".into(),
                    caller: "gateway@example.com".into(),
                }],
            }),
        }
    }

    #[test]
    fn an_answer_is_read_as_its_index_alone() {
        let bytes = answer(41).encode_to_vec();
        assert_eq!(Answer::decode(bytes.as_slice()).unwrap().index(), 41);
        assert_eq!(Answer::decode(&[][..]).unwrap().index(), 0);
    }

    #[test]
    fn a_malformed_answer_is_refused_though_its_fields_are_skipped() {
        let mut bytes = answer(3).encode_to_vec();
        bytes.truncate(bytes.len() - 10);
        assert!(Answer::decode(bytes.as_slice()).is_err());
    }

    #[test]
    fn answers_out_of_order_are_an_internal_error() {
        let second = Answer::decode(answer(1).encode_to_vec().as_slice()).unwrap();
        assert!(in_order(&second, 1).is_ok());
        let status = in_order(&second, 2).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "answer 2 of the stream came with index 1");
    }
}

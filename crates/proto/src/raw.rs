//! `PingService` with every message left encoded, for the hops that pass messages on unread.
//!
//! A hop reads no field of a request, and protobuf merges concatenated encodings of a message
//! (embedded messages merge, repeated fields append in order; "Merging" in the encoding guide),
//! so it adds its hop to an answer by putting an encoded `{ pong: { hops: [hop] } }` in front of
//! the upstream's bytes. Decoding every message only to encode it again was a tenth of a relay's
//! instructions per unary call, and more per streamed message as payloads grow.
//!
//! The wire contract is the same `runmesh.ping.v1.PingService`: reflection, the size limits and
//! every client see no difference. The hops frame these messages themselves (`runmesh-forward`),
//! so there is no generated code for them.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::ping::v1::{CollectResponse, Hop, Pong, SendResponse};

/// One encoded message of the API, as it came off (or goes on) the wire, and the bytes a hop
/// merges in front of it. Holding the two apart lets the encoder write both into the frame, so
/// adding a hop copies the message once, not twice.
#[derive(Debug, Clone, Default)]
pub struct Raw {
    head: Bytes,
    body: Bytes,
}

impl Raw {
    /// A message whose encoding is `body`.
    pub fn new(body: Bytes) -> Self {
        Self {
            head: Bytes::new(),
            body,
        }
    }

    /// The encoding of `message`.
    pub fn encode(message: &impl Message) -> Self {
        Self::new(message.encode_to_vec().into())
    }

    /// Decodes this message as `M`.
    pub fn decode<M: Message + Default>(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.head.clone().chain(self.body.clone()))
    }

    /// The message's length on the wire.
    pub fn encoded_len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Writes the message, its merged prefix first, into `dst`.
    pub fn write(&self, dst: &mut impl BufMut) {
        dst.put_slice(&self.head);
        dst.put_slice(&self.body);
    }

    /// This message with `head` merged in front: `head`'s repeated fields come first.
    pub fn after(self, head: Bytes) -> Self {
        let head = if self.head.is_empty() {
            head
        } else {
            let mut both = BytesMut::with_capacity(head.len() + self.head.len());
            both.put_slice(&head);
            both.put_slice(&self.head);
            both.freeze()
        };
        Self {
            head,
            body: self.body,
        }
    }
}

/// What a hop puts in front of each `SendResponse` to add `hop` to its trail:
/// `SendResponse { pong: { hops: [hop] } }`, encoded.
pub fn pong_prefix(hop: Hop) -> Bytes {
    let pong = SendResponse {
        pong: Some(Pong {
            hops: vec![hop],
            ..Pong::default()
        }),
    };
    pong.encode_to_vec().into()
}

/// What a hop puts in front of the `CollectResponse` to add `hop` to its trail:
/// `CollectResponse { hops: [hop] }`, encoded.
pub fn summary_prefix(hop: Hop) -> Bytes {
    let summary = CollectResponse {
        hops: vec![hop],
        ..CollectResponse::default()
    };
    summary.encode_to_vec().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ping::v1::Hop;

    fn hop(service: &str) -> Hop {
        Hop {
            service: service.into(),
            instance: "i".into(),
            caller: "c".into(),
        }
    }

    #[test]
    fn a_prefix_puts_the_hop_first_and_keeps_every_field_of_the_answer() {
        let answer = SendResponse {
            pong: Some(Pong {
                index: 7,
                message: "hello".into(),
                received_on: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 2,
                }),
                payload: vec![1, 2, 3],
                hops: vec![hop("relay"), hop("ping")],
            }),
        };
        let merged: SendResponse = Raw::encode(&answer)
            .after(pong_prefix(hop("gateway")))
            .decode()
            .unwrap();
        let mut expected = answer;
        expected
            .pong
            .as_mut()
            .unwrap()
            .hops
            .insert(0, hop("gateway"));
        assert_eq!(merged, expected);
    }

    #[test]
    fn prefixes_added_hop_after_hop_come_out_in_the_order_of_the_chain() {
        let answer = SendResponse {
            pong: Some(Pong {
                message: "hello".into(),
                hops: vec![hop("ping")],
                ..Pong::default()
            }),
        };
        let merged: SendResponse = Raw::encode(&answer)
            .after(pong_prefix(hop("relay")))
            .after(pong_prefix(hop("gateway")))
            .decode()
            .unwrap();
        let pong = merged.pong.unwrap();
        assert_eq!(pong.message, "hello");
        assert_eq!(pong.hops, vec![hop("gateway"), hop("relay"), hop("ping")]);
    }

    #[test]
    fn a_summary_prefix_puts_the_hop_first_and_keeps_the_counts() {
        let summary = CollectResponse {
            count: 3,
            payload_bytes: 12,
            last_message: "last".into(),
            hops: vec![hop("ping")],
        };
        let merged: CollectResponse = Raw::encode(&summary)
            .after(summary_prefix(hop("relay")))
            .decode()
            .unwrap();
        assert_eq!(merged.hops, vec![hop("relay"), hop("ping")]);
        assert_eq!(
            (merged.count, merged.payload_bytes, merged.last_message),
            (3, 12, "last".to_string())
        );
    }
}

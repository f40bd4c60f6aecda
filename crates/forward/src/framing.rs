//! gRPC's length-prefixed framing, both ways, for messages a hop passes on unread.
//!
//! Both sides of a hop use it: the server half for the caller's requests and this hop's answers
//! ([`crate::server`]), the client half for requests upstream and the upstream's answers
//! ([`crate::upstream::Grpc`]). Messages are cut out of the DATA chunks they arrived in, and
//! copied only when one spans two chunks; outgoing messages already waiting are framed together
//! into one buffer of exactly their size, so nothing is reallocated as a batch grows.
//!
//! Errors carry the codes and texts tonic gives them, so callers, `runtime::status` and
//! [`crate::ForwardError`] read them the same whichever side raised them.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Body;
use runmesh_proto::raw::Raw;
use tonic::Status;
use tower::BoxError;

/// gRPC's length prefix: a compression flag and a big-endian length.
pub(crate) const PREFIX: usize = 5;
/// Bytes framed into one DATA chunk before it is handed on, as tonic's encoder yields.
pub(crate) const YIELD_THRESHOLD: usize = 32 << 10;

/// The status for an outgoing message over the size limit (tonic's text; `OUT_OF_RANGE`, which
/// `runtime::status` reports as `RESOURCE_EXHAUSTED`).
pub(crate) fn too_large_to_send(len: usize, max_message_size: usize) -> Status {
    Status::out_of_range(format!(
        "Error, encoded message length too large: found {len} bytes, the limit is: {max_message_size} bytes"
    ))
}

/// Outgoing messages gathered until they are handed on as one chunk.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    messages: Vec<Raw>,
    len: usize,
}

impl Batch {
    /// Adds `message`, refusing it if it is over `max_message_size`.
    pub(crate) fn push(&mut self, message: Raw, max_message_size: usize) -> Result<(), Status> {
        let len = message.encoded_len();
        if len > max_message_size {
            return Err(too_large_to_send(len, max_message_size));
        }
        self.len += PREFIX + len;
        self.messages.push(message);
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// True once the batch is big enough to hand on without waiting for more.
    pub(crate) fn is_full(&self) -> bool {
        self.len >= YIELD_THRESHOLD
    }

    /// The batch framed into one buffer of its exact size; the batch is empty afterwards.
    pub(crate) fn take(&mut self) -> Bytes {
        let mut chunk = BytesMut::with_capacity(self.len);
        for message in self.messages.drain(..) {
            chunk.put_u8(0);
            chunk.put_u32(message.encoded_len() as u32);
            message.write(&mut chunk);
        }
        self.len = 0;
        chunk.freeze()
    }
}

/// The messages of an HTTP body, cut out of its DATA chunks, and its trailers once it ends.
#[derive(Debug)]
pub(crate) struct Deframe<B> {
    body: B,
    cut: Cutter,
    trailers: Option<HeaderMap>,
}

impl<B> Deframe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(body: B, max_message_size: usize) -> Self {
        Self {
            body,
            cut: Cutter::new(max_message_size),
            trailers: None,
        }
    }

    /// The trailers, once the body has ended with them.
    pub(crate) fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// The next whole message; `None` once the body has ended on a message boundary. A body
    /// that ends inside a message is `INTERNAL`, as tonic has it; a body error is its status.
    pub(crate) fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Raw>, Status>> {
        loop {
            if let Some(message) = self.cut.next()? {
                return Poll::Ready(Ok(Some(Raw::new(message))));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.cut.push(data),
                    Err(frame) => self.trailers = frame.into_trailers().ok(),
                },
                Some(Err(e)) => return Poll::Ready(Err(Status::from_error(e.into()))),
                None if self.cut.holds_partial() => {
                    return Poll::Ready(Err(Status::internal("Unexpected EOF decoding stream.")));
                }
                None => return Poll::Ready(Ok(None)),
            }
        }
    }
}

/// Cuts length-prefixed messages out of DATA chunks: a message inside one chunk is a slice of
/// it; one spanning chunks is gathered in `partial`. A prefix is checked (flag, size limit) as
/// soon as its five bytes are in, before anything of the message is buffered.
#[derive(Debug)]
pub(crate) struct Cutter {
    max_message_size: usize,
    chunk: Bytes,
    partial: BytesMut,
    /// The length of the message being gathered, once its prefix is complete.
    gathering: Option<usize>,
}

impl Cutter {
    pub(crate) fn new(max_message_size: usize) -> Self {
        Self {
            max_message_size,
            chunk: Bytes::new(),
            partial: BytesMut::new(),
            gathering: None,
        }
    }

    pub(crate) fn push(&mut self, data: Bytes) {
        debug_assert!(self.chunk.is_empty(), "a chunk is consumed before the next");
        self.chunk = data;
    }

    pub(crate) fn holds_partial(&self) -> bool {
        !self.partial.is_empty() || !self.chunk.is_empty()
    }

    /// The message length a prefix announces, if the prefix is acceptable.
    fn length(&self, prefix: &[u8]) -> Result<usize, Status> {
        match prefix[0] {
            0 => {}
            1 => {
                return Err(Status::internal(
                    "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                ));
            }
            f => {
                return Err(Status::internal(format!(
                    "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1)"
                )));
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max_message_size {
            return Err(Status::out_of_range(format!(
                "Error, decoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max_message_size
            )));
        }
        Ok(len)
    }

    /// The next whole message, or `None` until more data is pushed.
    pub(crate) fn next(&mut self) -> Result<Option<Bytes>, Status> {
        if self.partial.is_empty() && self.chunk.len() >= PREFIX {
            let len = self.length(&self.chunk[..PREFIX])?;
            if self.chunk.len() >= PREFIX + len {
                let message = self.chunk.slice(PREFIX..PREFIX + len);
                self.chunk.advance(PREFIX + len);
                return Ok(Some(message));
            }
        }
        while !self.chunk.is_empty() {
            let wanted = match self.gathering {
                None => PREFIX - self.partial.len(),
                Some(len) => PREFIX + len - self.partial.len(),
            };
            let take = wanted.min(self.chunk.len());
            self.partial.extend_from_slice(&self.chunk[..take]);
            self.chunk.advance(take);
            if take < wanted {
                break;
            }
            match self.gathering {
                None => {
                    let len = self.length(&self.partial)?;
                    self.partial.reserve(len);
                    self.gathering = Some(len);
                }
                Some(_) => {
                    self.gathering = None;
                    let mut message = self.partial.split().freeze();
                    message.advance(PREFIX);
                    return Ok(Some(message));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn frame(message: &[u8]) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&(message.len() as u32).to_be_bytes());
        f.extend_from_slice(message);
        f
    }

    fn cut_all(cut: &mut Cutter, chunks: Vec<Vec<u8>>) -> Result<Vec<Bytes>, Status> {
        let mut out = Vec::new();
        for chunk in chunks {
            cut.push(chunk.into());
            while let Some(m) = cut.next()? {
                out.push(m);
            }
        }
        Ok(out)
    }

    #[test]
    fn messages_are_cut_whole_from_a_chunk_and_gathered_across_chunks() {
        let mut stream = frame(b"one");
        stream.extend(frame(b""));
        stream.extend(frame(&[7; 300]));
        stream.extend(frame(b"four"));
        // Every split point: inside prefixes, inside messages, on boundaries.
        for at in 0..=stream.len() {
            for at2 in at..=stream.len() {
                let chunks = vec![
                    stream[..at].to_vec(),
                    stream[at..at2].to_vec(),
                    stream[at2..].to_vec(),
                ];
                let mut cut = Cutter::new(1024);
                let got = cut_all(&mut cut, chunks).unwrap();
                assert_eq!(
                    got,
                    [&b"one"[..], b"", &[7; 300], b"four"],
                    "split at {at}, {at2}"
                );
                assert!(!cut.holds_partial());
            }
        }
    }

    #[test]
    fn a_message_inside_one_chunk_is_not_copied() {
        let chunk = Bytes::from(frame(b"zero-copy"));
        let mut cut = Cutter::new(64);
        cut.push(chunk.clone());
        let message = cut.next().unwrap().unwrap();
        assert_eq!(message.as_ptr(), chunk[PREFIX..].as_ptr());
    }

    #[test]
    fn a_bad_prefix_is_refused_before_its_message_is_buffered() {
        let mut oversize = vec![0];
        oversize.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = cut_all(
            &mut Cutter::new(64),
            vec![oversize[..2].to_vec(), oversize[2..].to_vec()],
        )
        .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange);
        assert!(runmesh_runtime::status::is_size_limit(&err), "{err:?}");

        let mut compressed = frame(b"x");
        compressed[0] = 1;
        let err = cut_all(&mut Cutter::new(64), vec![compressed]).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("compressed-flag"), "{err:?}");

        let mut unknown = frame(b"x");
        unknown[0] = 7;
        let err = cut_all(&mut Cutter::new(64), vec![unknown]).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("flag: 7"), "{err:?}");
    }

    #[test]
    fn a_body_cut_inside_a_message_holds_a_partial() {
        let stream = frame(b"truncated");
        let mut cut = Cutter::new(64);
        assert!(
            cut_all(&mut cut, vec![stream[..7].to_vec()])
                .unwrap()
                .is_empty()
        );
        assert!(cut.holds_partial());
    }

    #[test]
    fn a_batch_is_framed_into_one_buffer_of_its_exact_size() {
        let mut batch = Batch::default();
        batch
            .push(Raw::new(Bytes::from_static(b"one")), 64)
            .unwrap();
        batch
            .push(
                Raw::new(Bytes::from_static(b"two")).after(Bytes::from_static(b"<")),
                64,
            )
            .unwrap();
        let chunk = batch.take();
        let mut expected = frame(b"one");
        expected.extend(frame(b"<two"));
        assert_eq!(chunk, expected);
        assert!(batch.is_empty());
        assert!(batch.take().is_empty(), "taking empties the batch");
    }

    #[test]
    fn a_batch_refuses_a_message_over_the_limit_with_tonics_status() {
        let mut batch = Batch::default();
        let err = batch
            .push(Raw::new(Bytes::from_static(b"12345")), 4)
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange);
        assert!(runmesh_runtime::status::is_size_limit(&err), "{err:?}");
        assert!(batch.is_empty());
    }

    #[test]
    fn a_batch_is_full_at_the_yield_threshold() {
        let mut batch = Batch::default();
        let big = Raw::new(Bytes::from(vec![0; YIELD_THRESHOLD - PREFIX - 1]));
        batch.push(big, usize::MAX).unwrap();
        assert!(!batch.is_full());
        batch
            .push(Raw::new(Bytes::from_static(b"x")), usize::MAX)
            .unwrap();
        assert!(batch.is_full());
    }
}

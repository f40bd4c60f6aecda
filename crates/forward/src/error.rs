//! The errors a forwarding hop raises itself; upstream statuses pass through unchanged.

use std::error::Error as _;

use tonic::{Code, Status};

use crate::upstream::TransportError;

/// What can go wrong at this hop; the one place these get their gRPC code and log level.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No connection to the upstream could be made or kept.
    #[error("{hop}: upstream {url} unreachable: {reason}")]
    Unreachable {
        /// This hop's name.
        hop: &'static str,
        /// The upstream URL.
        url: String,
        /// What the transport said.
        reason: String,
    },
    /// The caller's deadline passed while waiting on the upstream.
    #[error("{hop}: deadline exceeded waiting for upstream {url}")]
    DeadlineExceeded {
        /// This hop's name.
        hop: &'static str,
        /// The upstream URL.
        url: String,
    },
    /// A message was over this hop's size limit.
    #[error("{hop}: {reason}")]
    MessageTooLarge {
        /// This hop's name.
        hop: &'static str,
        /// tonic's description of the limit hit.
        reason: String,
    },
    /// The upstream answered with this status; it goes back to the caller as it is.
    #[error("{}: {}", .0.code(), .0.message())]
    Upstream(Status),
}

impl ForwardError {
    /// Sorts a status seen on the upstream call into a local failure or the upstream's answer.
    ///
    /// tonic gives locally raised transport errors a source error; statuses read from the wire
    /// have none.
    pub fn classify(hop: &'static str, url: &str, status: Status) -> Self {
        if runmesh_runtime::status::is_size_limit(&status) {
            return Self::MessageTooLarge {
                hop,
                reason: status.message().to_string(),
            };
        }
        if status.source().is_some() {
            let reason = status
                .source()
                .map(|e| {
                    let mut s = e.to_string();
                    let mut cur = e.source();
                    while let Some(inner) = cur {
                        s.push_str(": ");
                        s.push_str(&inner.to_string());
                        cur = inner.source();
                    }
                    s
                })
                .unwrap_or_default();
            return match status.code() {
                Code::DeadlineExceeded | Code::Cancelled if reason.contains("imeout") => {
                    Self::DeadlineExceeded {
                        hop,
                        url: url.to_string(),
                    }
                }
                _ => Self::Unreachable {
                    hop,
                    url: url.to_string(),
                    reason,
                },
            };
        }
        Self::Upstream(status)
    }
}

impl ForwardError {
    /// Whether the failed call provably never reached the upstream, so sending it again cannot
    /// run it twice: its connection was closing or closed before the stream opened, or the
    /// upstream refused the stream unprocessed (`REFUSED_STREAM`, or a GOAWAY below its id).
    pub fn never_sent(status: &Status) -> bool {
        let mut cause = status.source();
        while let Some(e) = cause {
            if e.downcast_ref::<TransportError>()
                .is_some_and(TransportError::is_not_sent)
                || e.downcast_ref::<h2::Error>()
                    .is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM))
            {
                return true;
            }
            cause = e.source();
        }
        false
    }
}

impl From<ForwardError> for Status {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::Unreachable { .. } => {
                tracing::warn!(error = %e, "upstream unreachable");
                Status::unavailable(e.to_string())
            }
            ForwardError::DeadlineExceeded { .. } => {
                tracing::info!(error = %e, "deadline exceeded");
                Status::deadline_exceeded(e.to_string())
            }
            ForwardError::MessageTooLarge { .. } => {
                tracing::info!(error = %e, "message too large");
                Status::resource_exhausted(e.to_string())
            }
            ForwardError::Upstream(status) => {
                tracing::debug!(code = ?status.code(), "upstream status passed through");
                status
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_statuses_pass_through_unchanged() {
        let s = Status::permission_denied("ping: caller not allowed");
        let out: Status = ForwardError::classify("relay", "http://ping:8080", s).into();
        assert_eq!(out.code(), Code::PermissionDenied);
        assert_eq!(out.message(), "ping: caller not allowed");
    }

    #[test]
    fn transport_failures_name_the_hop_and_the_upstream() {
        let s = Status::from_error(Box::new(std::io::Error::other("connection refused")));
        let out: Status = ForwardError::classify("relay", "http://ping:8080", s).into();
        assert_eq!(out.code(), Code::Unavailable);
        assert!(
            out.message()
                .starts_with("relay: upstream http://ping:8080 unreachable"),
            "{}",
            out.message()
        );
    }

    #[test]
    fn only_unprocessed_calls_count_as_never_sent() {
        let refused = Status::from_error(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert!(ForwardError::never_sent(&refused));
        let reset = Status::from_error(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        assert!(!ForwardError::never_sent(&reset));
        assert!(!ForwardError::never_sent(&Status::unavailable(
            "from the wire"
        )));
    }

    #[test]
    fn size_limits_are_resource_exhausted() {
        let s = Status::out_of_range("Error, encoded message length too large: found 9 bytes");
        let out: Status = ForwardError::classify("gateway", "u", s).into();
        assert_eq!(out.code(), Code::ResourceExhausted);
        assert!(out.message().starts_with("gateway: "));
    }
}

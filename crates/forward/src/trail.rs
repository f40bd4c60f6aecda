//! This hop's entry in the trail of every answer, encoded once per caller.
//!
//! A hop adds itself to an answer's trail by writing an encoded `{hops: [hop]}` in front of the
//! upstream's bytes ([`runmesh_proto::raw`]). Building that entry (three strings) and encoding it
//! took ~2 k instructions and four allocations of every call, for the same bytes each time:
//! the entry depends only on the caller, and callers are few (a relay's is its gateway, a
//! gateway's are its users). So the encodings are kept per caller, the most recent
//! [`CALLERS`] of them.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use lru::LruCache;
use runmesh_proto::raw::{pong_prefix, summary_prefix};
use runmesh_runtime::Identity;

/// Callers whose entries are kept; beyond them, the least recently seen is encoded again.
const CALLERS: NonZeroUsize = NonZeroUsize::new(256).unwrap();

/// This hop's entry, as each kind of answer carries it.
#[derive(Debug)]
pub(crate) struct Entry {
    /// In front of a `SendResponse` (a streamed one too).
    pub(crate) pong: Bytes,
    /// In front of a `CollectResponse`.
    pub(crate) summary: Bytes,
}

/// The entries of one hop, by caller.
#[derive(Debug)]
pub(crate) struct Trail {
    identity: Identity,
    known: Mutex<LruCache<String, Arc<Entry>>>,
}

impl Trail {
    pub(crate) fn new(identity: Identity) -> Self {
        Self {
            identity,
            known: Mutex::new(LruCache::new(CALLERS)),
        }
    }

    /// The entry for an answer to `caller`, the verified caller (none with auth off).
    pub(crate) fn entry(&self, caller: Option<&str>) -> Arc<Entry> {
        let key = caller.unwrap_or_default();
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = known.get(key) {
            return entry.clone();
        }
        let hop = self.identity.hop(caller);
        let entry = Arc::new(Entry {
            pong: pong_prefix(hop.clone()),
            summary: summary_prefix(hop),
        });
        known.put(key.to_owned(), entry.clone());
        entry
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use runmesh_proto::ping::v1::{CollectResponse, Hop, SendResponse};

    use super::*;

    fn trail() -> Trail {
        Trail::new(Identity {
            service: "relay",
            instance: "relay-00001".into(),
        })
    }

    fn hop(caller: &str) -> Hop {
        Hop {
            service: "relay".into(),
            instance: "relay-00001".into(),
            caller: caller.into(),
        }
    }

    #[test]
    fn each_callers_entry_names_them_and_is_encoded_once() {
        let trail = trail();
        let gateway = trail.entry(Some("gateway@p.iam.gserviceaccount.com"));
        let pong = SendResponse::decode(gateway.pong.clone())
            .unwrap()
            .pong
            .unwrap();
        assert_eq!(pong.hops, [hop("gateway@p.iam.gserviceaccount.com")]);
        let summary = CollectResponse::decode(gateway.summary.clone()).unwrap();
        assert_eq!(summary.hops, [hop("gateway@p.iam.gserviceaccount.com")]);

        let anonymous = trail.entry(None);
        let pong = SendResponse::decode(anonymous.pong.clone())
            .unwrap()
            .pong
            .unwrap();
        assert_eq!(pong.hops, [hop("")]);

        assert!(Arc::ptr_eq(
            &gateway,
            &trail.entry(Some("gateway@p.iam.gserviceaccount.com"))
        ));
        assert!(Arc::ptr_eq(&anonymous, &trail.entry(None)));
        assert!(!Arc::ptr_eq(&gateway, &anonymous));
    }

    #[test]
    fn only_the_most_recent_callers_are_kept() {
        let trail = trail();
        let first = trail.entry(Some("user-0@example.com"));
        for i in 1..=CALLERS.get() {
            trail.entry(Some(&format!("user-{i}@example.com")));
        }
        assert_eq!(trail.known.lock().unwrap().len(), CALLERS.get());
        let again = trail.entry(Some("user-0@example.com"));
        assert!(!Arc::ptr_eq(&first, &again), "the oldest was dropped");
        assert_eq!(first.pong, again.pong);
    }
}

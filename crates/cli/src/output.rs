//! How pongs and summaries are shown: a line per pong for people, JSON lines for scripts.

use runmesh_proto::ping::v1::{CollectResponse, Hop, Pong};
use serde_json::{Value, json};

fn hop_json(h: &Hop) -> Value {
    json!({"service": h.service, "instance": h.instance, "caller": h.caller})
}

fn trail(hops: &[Hop]) -> String {
    hops.iter()
        .map(|h| {
            let caller = if h.caller.is_empty() { "-" } else { &h.caller };
            format!("{} (caller {caller})", h.service)
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

/// A pong as one JSON object.
pub(crate) fn pong_json(p: &Pong) -> Value {
    let received = p.received_on.map(|t| t.to_string()).unwrap_or_default();
    json!({
        "index": p.index,
        "message": p.message,
        "payload_bytes": p.payload.len(),
        "received_on": received,
        "hops": p.hops.iter().map(hop_json).collect::<Vec<_>>(),
    })
}

/// A pong as one line a person reads.
pub(crate) fn pong_text(p: &Pong) -> String {
    format!(
        "pong #{} {:?} ({} B) via {}",
        p.index,
        p.message,
        p.payload.len(),
        trail(&p.hops)
    )
}

/// A `Collect` summary as one JSON object.
pub(crate) fn summary_json(c: &CollectResponse) -> Value {
    json!({
        "count": c.count,
        "payload_bytes": c.payload_bytes,
        "last_message": c.last_message,
        "hops": c.hops.iter().map(hop_json).collect::<Vec<_>>(),
    })
}

/// A `Collect` summary as one line a person reads.
pub(crate) fn summary_text(c: &CollectResponse) -> String {
    format!(
        "collected {} pings ({} B payload), last {:?}, via {}",
        c.count,
        c.payload_bytes,
        c.last_message,
        trail(&c.hops)
    )
}

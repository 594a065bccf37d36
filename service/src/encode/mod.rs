//! Encoders of the event stream, below the subscriptions and above the
//! catalog: [`full`] (`EVENT_ENCODING_FULL`, one [`v1::Event`] an event,
//! with its trace line) and [`packed`] (`EVENT_ENCODING_PACKED`, columns
//! with one schema per probe and stream). They read probe metadata from
//! the catalog and never look at the server or the subscriptions.

pub(crate) mod full;
pub(crate) mod packed;

use introspect::Event;
use proto::v1::{self, subscribe_response::Payload};

use crate::catalog::ProbeMeta;
use crate::symbols::Symbols;
use packed::PackedEncoder;

/// The batch being built, in the subscription's encoding.
pub(crate) enum Batch {
    Full(Vec<v1::Event>),
    Packed(Box<PackedEncoder>),
}

impl Batch {
    /// An empty batch, packed or full (with room for `capacity` events).
    pub fn new(packed: bool, capacity: usize) -> Self {
        if packed {
            Batch::Packed(Box::default())
        } else {
            Batch::Full(Vec::with_capacity(capacity))
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Batch::Full(v) => v.len(),
            Batch::Packed(p) => p.len(),
        }
    }

    /// Adds `ev`; gives it back when the encoding only borrowed it (the
    /// caller can then return it to the engine for reuse).
    pub fn push(
        &mut self,
        ev: Event,
        meta: Option<&ProbeMeta>,
        symbols: &Symbols,
    ) -> Option<Event> {
        match self {
            Batch::Full(v) => {
                v.push(full::event(ev, meta, symbols));
                None
            }
            Batch::Packed(p) => {
                p.push(&ev, meta);
                Some(ev)
            }
        }
    }

    /// The messages that send the batch, leaving it empty.
    pub fn take(&mut self, capacity: usize) -> Vec<Payload> {
        match self {
            Batch::Full(v) if v.is_empty() => Vec::new(),
            Batch::Full(v) => vec![Payload::Events(v1::EventBatch {
                events: std::mem::replace(v, Vec::with_capacity(capacity)),
            })],
            Batch::Packed(p) => p.take(),
        }
    }
}

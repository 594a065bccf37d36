//! Limits and defaults of the service (a leaf: read by the probe table
//! code and by the subscriptions).

/// Limits and defaults of the service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Most probes defined at once (RESOURCE_EXHAUSTED beyond).
    pub max_probes: usize,
    /// Most concurrent subscriptions (RESOURCE_EXHAUSTED beyond).
    pub max_subscribers: usize,
    /// Subscriber queue size when the request leaves it 0.
    pub default_queue_capacity: u32,
    /// Largest subscriber queue a client may ask for.
    pub max_queue_capacity: u32,
    /// Sum of all subscribers' queue capacities (events). A full queue of
    /// events with strings costs ~150 bytes an event, so the default
    /// (4 Mi events) bounds the queues together near 600 MiB.
    pub max_queued_events_total: u64,
    /// Events per batch when the request leaves it 0.
    pub default_batch_events: u32,
    /// Largest batch a client may ask for.
    pub max_batch_events: u32,
    /// Batching delay when the request leaves it 0.
    pub default_batch_delay_ms: u32,
    /// Longest batching delay a client may ask for.
    pub max_batch_delay_ms: u32,
    /// Whether probes may have actions (override, freeze, snapshot), which
    /// change what the guest does: `hvprobe run --allow-actions`.
    pub allow_actions: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_probes: 4096,
            max_subscribers: 64,
            default_queue_capacity: 16384,
            max_queue_capacity: 1 << 20,
            max_queued_events_total: 1 << 22,
            default_batch_events: 512,
            max_batch_events: 16384,
            default_batch_delay_ms: 20,
            max_batch_delay_ms: 10_000,
            allow_actions: false,
        }
    }
}

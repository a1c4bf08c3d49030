//! Observability of the data path: counters per VM and drop reason ([`counters`]), rendered in
//! Prometheus text format by the exporter.

pub mod counters;
pub mod prometheus;

//! urbanstream: a stream processing engine for a city's sensor and camera feeds.
//!
//! It consumes the city's Kafka topics, decodes records into Apache Arrow batches, runs
//! continuous queries on Apache DataFusion, and publishes indicators back to Kafka:
//!
//! ```text
//! Kafka topics ─► source ─► decode ─► time ─► plan/operators ─► state ─► sink ─► Kafka topics
//!  (rdkafka)     (consumer  (bytes →  (event    (DataFusion SQL,  (window   (producer,
//!                group,      Arrow     time,     UDF/UDAF from     state)    DLQ, late
//!                offsets)    batches)  water-    operators/)                 output)
//!                                      marks)
//! ```
//!
//! - [`source::KafkaSource`] reads [`source::RawBatch`]es, one per topic, from a consumer group.
//! - [`decode::JsonDecoder`] turns them into `RecordBatch`es with the topic's schema from
//!   [`schema`] (Avro files in `schemas/topics/`), and isolates bad records for the DLQ.
//! - [`time::WatermarkTracker`] follows event time per partition.
//! - [`plan::stream::StreamQuery`] is an analyst's `INSERT INTO … SELECT …` planned by
//!   DataFusion and run incrementally: windowed aggregates keep their partial state in
//!   [`state`] and emit when the watermark passes a window's end.
//! - [`sink::KafkaSink`] publishes indicator, DLQ and late records.
//! - [`pipeline::Pipeline`] runs the loop and commits offsets once outputs are acknowledged.
//! - [`simulate::CitySimulator`] produces a simulated Hanoi; [`broker::EmbeddedBroker`] is
//!   an in-process Kafka-protocol broker; [`bench`] is the latency harness; [`service`] is
//!   `urbanstream serve` (REST API, catalog, metrics); [`cli`] is the `urbanstream` command.

pub mod decode;
pub mod plan;
pub mod sink;
pub mod source;
pub mod state;
pub mod time;

pub mod bench;
pub mod broker;
pub mod checkpoint;
pub mod cli;
pub mod dashboard;
pub mod deterministic;
/// The files of `schemas/` and `queries/`, compiled in (listed by the build script, so a new
/// file needs no code).
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}
pub mod error;
pub mod evaluate;
pub mod files;
pub mod pipeline;
pub mod reference;
pub mod schema;
pub mod service;
pub mod signals;
pub mod simulate;
pub mod telemetry;
pub mod topics;

pub use error::{Error, Result};

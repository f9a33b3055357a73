//! Delivery reports of the sink's producer, served by a thread that sleeps while nothing is
//! delivered.
//!
//! rdkafka's `FutureProducer` serves them from a thread of its own that calls
//! `poll(100 ms)` in a loop. Each call's first wait is its deadline's remaining time cut to
//! whole milliseconds (99 ms), and the call then asks again, without waiting, until the
//! deadline has passed: about a millisecond of spinning in every hundred, near 1 % of a core
//! per query while it is idle (a seventh of a core for the 20 built-in queries, measured with
//! `perf`: a third of an idle service's samples were `clock_gettime` in those threads;
//! benches/README.md, "An idle service"). Here one call
//! lasts [`POLL_SLICE`], a second and a tenth of a millisecond: its first wait is then a whole
//! second, and what is left after it (a tenth of a millisecond less the wait's overshoot) is
//! the most the call can spin, once a second. A delivery report still completes its record's
//! [`Delivery`] as soon as it arrives (the call serves events as they come, it only returns
//! at its deadline).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaResult;
use rdkafka::producer::{BaseProducer, DeliveryResult, ProducerContext};

use crate::error::{Error, Result};

/// The broker's answer for one record: completed by the delivery report.
pub type Delivery = tokio::sync::oneshot::Receiver<KafkaResult<()>>;

/// How long one poll of the delivery thread lasts: the longest a dropped sink's thread
/// outlives it. The tenth of a millisecond over the second keeps the call's first wait (its
/// remaining time cut to whole milliseconds) at a full second: with a whole second, it waits
/// 999 ms and spins through the last one.
const POLL_SLICE: Duration = Duration::from_micros(1_000_100);

/// The producer's context: completes each record's [`Delivery`].
pub struct Deliveries;

impl ClientContext for Deliveries {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::error::log_kafka_client_error(&error, reason);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<tokio::sync::oneshot::Sender<KafkaResult<()>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivered: Self::DeliveryOpaque) {
        // Nobody waits for a record whose sink was dropped.
        let _ = delivered.send(match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        });
    }
}

/// The thread serving a producer's delivery reports; stopped (not joined) when dropped.
pub struct DeliveryPoller {
    stop: Arc<AtomicBool>,
    _thread: JoinHandle<()>,
}

impl DeliveryPoller {
    /// Starts serving `producer`'s events, on a thread named for `query`.
    pub fn start(producer: &Arc<BaseProducer<Deliveries>>, query: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (producer, stop) = (producer.clone(), stop.clone());
            let name: String = format!("deliver {query}").chars().take(15).collect();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        producer.poll(POLL_SLICE);
                    }
                })
                .map_err(|e| Error::Config(format!("cannot start a delivery thread: {e}")))?
        };
        Ok(Self {
            stop,
            _thread: thread,
        })
    }
}

impl Drop for DeliveryPoller {
    fn drop(&mut self) {
        // The thread ends within one poll and drops its handle on the producer then; joining
        // here would hold up whoever drops the sink (a runtime worker) for up to a second.
        self.stop.store(true, Ordering::Release);
    }
}

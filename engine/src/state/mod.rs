//! State: what stream queries keep between micro-batches.
//!
//! [`window::WindowOperator`] holds the incremental aggregation state of windowed queries:
//! per pane, DataFusion group keys and accumulator state, never raw events.

pub mod window;

//! urbanstream's SQL functions, as plain DataFusion functions usable by any DataFusion program.
//!
//! This crate depends only on DataFusion (and through it Arrow): no Kafka, no async runtime.
//! [`register_all`] adds every function to a `SessionContext`:
//!
//! - [`window`]: `tumble`, `hop`, `session`, `cumulate`, the stream-window functions written in
//!   a stream query's `GROUP BY`.

pub mod window;

use std::sync::Arc;

use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionContext;

/// Every scalar function of this crate.
pub fn scalar_functions() -> Vec<Arc<ScalarUDF>> {
    vec![
        Arc::new(ScalarUDF::from(window::TumbleFunc::default())),
        Arc::new(ScalarUDF::from(window::HopFunc::default())),
        Arc::new(ScalarUDF::from(window::SessionFunc::default())),
        Arc::new(ScalarUDF::from(window::CumulateFunc::default())),
    ]
}

/// Registers every function of this crate with `ctx`.
pub fn register_all(ctx: &SessionContext) {
    for f in scalar_functions() {
        ctx.register_udf(f.as_ref().clone());
    }
}

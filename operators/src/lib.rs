//! urbanstream's SQL functions, as plain DataFusion functions usable by any DataFusion program.
//!
//! This crate depends only on DataFusion (and through it Arrow): no Kafka, no async runtime.
//! [`register_all`] adds every function to a `SessionContext`:
//!
//! - [`window`]: `tumble`, `hop`, `session`, `cumulate`, the stream-window functions written in
//!   a stream query's `GROUP BY`.
//! - [`indicator`]: city indicators: `vn_aqi_sub`, `vn_aqi`, `vn_aqi_daily`,
//!   `vn_aqi_dominant`, `vn_aqi_category` (Decision 1459/QĐ-TCMT); traffic: `pcu`, `tti`,
//!   `los_urban`, `los_freeway`.

pub mod indicator;
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
        Arc::new(ScalarUDF::from(
            indicator::vn_aqi_sub::VnAqiSubFunc::default(),
        )),
        Arc::new(ScalarUDF::from(indicator::vn_aqi::VnAqiFunc::default())),
        Arc::new(ScalarUDF::from(
            indicator::vn_aqi_daily::VnAqiDailyFunc::default(),
        )),
        Arc::new(ScalarUDF::from(
            indicator::vn_aqi_dominant::VnAqiDominantFunc::default(),
        )),
        Arc::new(ScalarUDF::from(
            indicator::vn_aqi_category::VnAqiCategoryFunc::default(),
        )),
        Arc::new(ScalarUDF::from(indicator::pcu::PcuFunc::default())),
        Arc::new(ScalarUDF::from(indicator::tti::TtiFunc::default())),
        Arc::new(ScalarUDF::from(
            indicator::los_urban::LosUrbanFunc::default(),
        )),
        Arc::new(ScalarUDF::from(
            indicator::los_freeway::LosFreewayFunc::default(),
        )),
    ]
}

/// Registers every function of this crate with `ctx`.
pub fn register_all(ctx: &SessionContext) {
    for f in scalar_functions() {
        ctx.register_udf(f.as_ref().clone());
    }
}

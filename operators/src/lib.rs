//! urbanstream's SQL functions, as plain DataFusion functions usable by any DataFusion program.
//!
//! This crate depends only on DataFusion (and through it Arrow): no Kafka, no async runtime.
//! [`register_all`] adds every function to a `SessionContext`:
//!
//! - [`window`]: `tumble`, `hop`, `session`, `cumulate`, the stream-window functions written in
//!   a stream query's `GROUP BY`.
//! - [`indicator`]: city indicators. Air: `vn_aqi_sub`, `vn_aqi`, `vn_aqi_daily`,
//!   `vn_aqi_dominant`, `vn_aqi_category` (Decision 1459/QĐ-TCMT); `us_aqi_sub`, `us_aqi`,
//!   `us_aqi_category`, `ugm3_to_ppb`, `ppb_to_ugm3` (US EPA, 2024); the aggregate
//!   `hourly_means` with `nowcast`, `hour_at`, `hour_mean`, `hours_mean`, `hours_max`, `hours_max_mean`,
//!   `hours_complete`. Traffic: `pcu`, `tti`, `los_urban`, `los_freeway`, `density`, `v_c`,
//!   `flow_rate` and the aggregates `space_mean_speed`, `pti`, `buffer_index`. Data quality:
//!   `reading_valid`, `complete`.
//! - [`detect`]: anomaly detectors `anomaly_ewma`, `anomaly_mad`, `anomaly_cusum`,
//!   `anomaly_seasonal`, `anomaly_score` (the default); sensor health `sensor_stuck`,
//!   `sensor_out_of_range`, `sensor_missing`, `sensor_jump`; and `alert_state`, which turns
//!   scores into RAISED / UPDATED / CLEARED transitions. All are window functions written
//!   `f(value, ts, …) OVER (PARTITION BY key ORDER BY ts)`.

pub mod detect;
pub mod indicator;
pub mod window;

use std::sync::Arc;

use datafusion::logical_expr::{AggregateUDF, ScalarUDF, WindowUDF};
use datafusion::prelude::SessionContext;

/// Every scalar function of this crate.
pub fn scalar_functions() -> Vec<Arc<ScalarUDF>> {
    let mut functions = vec![
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
        Arc::new(ScalarUDF::from(indicator::nowcast::NowcastFunc::default())),
    ];
    {
        use indicator::hours::{HoursFunc, HoursKind};
        use indicator::quality::{QualityFunc, QualityKind};
        use indicator::traffic_funcs::{TrafficFunc, TrafficKind};
        use indicator::us_aqi::{UsAqiFunc, UsAqiKind};
        for k in [
            HoursKind::HourAt,
            HoursKind::HourMean,
            HoursKind::Mean,
            HoursKind::Max,
            HoursKind::MaxMean,
            HoursKind::Complete,
        ] {
            functions.push(Arc::new(ScalarUDF::from(HoursFunc::new(k))));
        }
        for k in [UsAqiKind::Sub, UsAqiKind::Overall, UsAqiKind::Category] {
            functions.push(Arc::new(ScalarUDF::from(UsAqiFunc::new(k))));
        }
        for to_ppb in [true, false] {
            functions.push(Arc::new(ScalarUDF::from(
                indicator::gas_units::GasUnitFunc::new(to_ppb),
            )));
        }
        for k in [
            TrafficKind::Density,
            TrafficKind::VolumeCapacity,
            TrafficKind::FlowRate,
        ] {
            functions.push(Arc::new(ScalarUDF::from(TrafficFunc::new(k))));
        }
        for k in [QualityKind::RangeValid, QualityKind::Complete] {
            functions.push(Arc::new(ScalarUDF::from(QualityFunc::new(k))));
        }
    }
    functions
}

/// Every aggregate function of this crate.
pub fn aggregate_functions() -> Vec<Arc<AggregateUDF>> {
    use indicator::traffic_aggs::{TrafficAggFunc, TrafficAggKind};
    vec![
        Arc::new(AggregateUDF::from(
            indicator::hourly_means::HourlyMeansFunc::default(),
        )),
        Arc::new(AggregateUDF::from(TrafficAggFunc::new(
            TrafficAggKind::SpaceMeanSpeed,
        ))),
        Arc::new(AggregateUDF::from(TrafficAggFunc::new(TrafficAggKind::Pti))),
        Arc::new(AggregateUDF::from(TrafficAggFunc::new(
            TrafficAggKind::BufferIndex,
        ))),
    ]
}

/// Every window function of this crate: the detectors, health checks and alert machine.
pub fn window_functions() -> Vec<Arc<WindowUDF>> {
    detect::udwf::window_functions()
}

/// Registers every function of this crate with `ctx`.
pub fn register_all(ctx: &SessionContext) {
    for f in scalar_functions() {
        ctx.register_udf(f.as_ref().clone());
    }
    for f in aggregate_functions() {
        ctx.register_udaf(f.as_ref().clone());
    }
    for f in window_functions() {
        ctx.register_udwf(f.as_ref().clone());
    }
}

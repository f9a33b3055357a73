//! Indicator functions over 1 M rows, in rows per second: VN_AQI and US AQI sub-indices, the
//! station VN_AQI, traffic formulas (PCU, TTI, LOS), and the aggregates (space-mean speed,
//! hourly means with NowCast) grouped per segment or sensor. Each runs as a DataFusion query
//! over simulated, decoded batches of 8 192 rows (the engine's batch size).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use urbanstream::simulate::SimTopic;
use urbanstream_benches::decoded_batches;

const ROWS: usize = 1_000_000;

fn context() -> SessionContext {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    urbanstream_operators::register_all(&ctx);
    for (name, topic, schema) in [
        ("air", SimTopic::Air, "air_reading"),
        ("cam", SimTopic::Camera, "camera_event"),
    ] {
        let batches = decoded_batches(topic, schema, ROWS);
        let table = MemTable::try_new(batches[0].schema(), vec![batches]).expect("table");
        ctx.register_table(name, Arc::new(table)).expect("register");
    }
    ctx
}

fn indicators(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ctx = context();
    let mut group = c.benchmark_group("indicators");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROWS as u64));
    let cases = [
        ("vn_aqi_sub", "SELECT vn_aqi_sub('pm25', pm25) FROM air"),
        (
            "vn_aqi",
            "SELECT vn_aqi(pm25, pm10, o3, no2, so2, co) FROM air",
        ),
        ("us_aqi_sub", "SELECT us_aqi_sub('pm25', pm25) FROM air"),
        ("pcu", "SELECT pcu(vehicle_class) FROM cam"),
        (
            "tti_los_urban",
            "SELECT tti(50, speed_kmh), los_urban(speed_kmh, 50, 0.8) FROM cam",
        ),
        (
            "space_mean_speed_per_segment",
            "SELECT segment_id, space_mean_speed(speed_kmh) FROM cam GROUP BY segment_id",
        ),
        (
            "hourly_means_nowcast_per_sensor",
            "SELECT sensor_id, nowcast(hourly_means(pm25, event_time, 60), max(event_time)) \
             FROM air GROUP BY sensor_id",
        ),
    ];
    for (name, sql) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let batches = ctx
                        .sql(sql)
                        .await
                        .expect("plan")
                        .collect()
                        .await
                        .expect("run");
                    assert!(batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
                    batches
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, indicators);
criterion_main!(benches);

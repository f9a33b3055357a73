//! The integration tests of `tests/`, one module per file, linked into one test binary: each
//! binary carries the whole engine (about 200 MB unoptimised), so one binary instead of one
//! per file keeps a clean build's disk and link time small. Run one file's tests with its
//! module name as the filter: `cargo test -p urbanstream-tests --test integration
//! stream_properties::`. The SQL logic tests (`slt.rs`) have their own runner and binary.

mod alert_splits;
mod changelog_properties;
mod city_patterns;
mod city_services;
mod hostile_input;
mod input_formats;
mod join_properties;
mod linear_road;
mod pipeline_e2e;
mod replay;
mod sql_reference;
mod sql_trees;
mod stream_properties;
mod stream_semantics;

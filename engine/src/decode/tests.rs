use datafusion::arrow::array::{AsArray, Float64Array, TimestampMillisecondArray};
use datafusion::arrow::datatypes::Float64Type;

use super::*;
use crate::schema::SchemaRegistry;

fn camera_decoder() -> JsonDecoder {
    let registry = SchemaRegistry::embedded().expect("schemas");
    JsonDecoder::new(registry.get("camera_event").expect("camera schema"))
}

fn raw(values: &[&[u8]]) -> RawBatch {
    let mut b = RawBatch::new("city.camera.events");
    for (i, v) in values.iter().enumerate() {
        b.push(0, i as i64, Some(b"seg"), Some(v));
    }
    b
}

const GOOD: &[u8] = br#"{"camera_id":"cam-0001","segment_id":"kim_ma_w","event_time":1767222000000,"kind":"detection","vehicle_class":"motorbike","speed_kmh":31.5,"lane":1,"direction":"inbound","confidence":0.93}"#;
const GOOD2: &[u8] = br#"{"camera_id":"cam-0002","segment_id":"kim_ma_w","event_time":1767222001000,"vehicle_class":"car","speed_kmh":40,"confidence":0.9}"#;

fn reject_of(values: &[&[u8]]) -> Reject {
    let d = camera_decoder().decode(&raw(values)).expect("decode");
    assert_eq!(d.rejects.len(), 1, "{:?}", d.rejects);
    d.rejects[0].clone()
}

#[test]
fn valid_records_decode_with_defaults() {
    let d = camera_decoder()
        .decode(&raw(&[GOOD, GOOD2]))
        .expect("decode");
    assert!(d.rejects.is_empty(), "{:?}", d.rejects);
    assert_eq!(d.batch.num_rows(), 2);
    assert_eq!(d.rows, vec![0, 1]);
    let kind = d
        .batch
        .column_by_name("kind")
        .expect("kind")
        .as_string::<i32>();
    // GOOD2 has no kind: the Avro default fills it.
    assert_eq!(kind.value(1), "detection");
    let speed = d.batch.column_by_name("speed_kmh").expect("speed");
    let speed = speed.as_any().downcast_ref::<Float64Array>().expect("f64");
    assert_eq!(speed.value(1), 40.0);
    let t = d.batch.column_by_name("event_time").expect("time");
    let t = t
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .expect("ts");
    assert_eq!(t.value(0), 1_767_222_000_000);
    assert!(
        !d.batch
            .schema()
            .field_with_name("kind")
            .expect("kind")
            .is_nullable()
    );
}

#[test]
fn missing_required_field_is_named() {
    let r = reject_of(&[
        GOOD,
        br#"{"segment_id":"s","event_time":1,"confidence":0.5}"#,
    ]);
    assert_eq!(r.index, 1);
    assert_eq!(r.stage, RejectStage::Validate);
    assert_eq!(r.error, "missing required field camera_id");
}

#[test]
fn explicit_null_in_required_field_is_rejected() {
    let r = reject_of(&[br#"{"camera_id":null,"segment_id":"s","event_time":1,"confidence":0.5}"#]);
    assert_eq!(r.error, "missing required field camera_id");
}

#[test]
fn wrong_type_is_rejected_alone() {
    let bad =
        br#"{"camera_id":"c","segment_id":"s","event_time":1,"confidence":0.5,"speed_kmh":"fast"}"#;
    let d = camera_decoder()
        .decode(&raw(&[GOOD, bad, GOOD2]))
        .expect("decode");
    assert_eq!(d.rows, vec![0, 2]);
    assert_eq!(d.rejects.len(), 1);
    assert_eq!(d.rejects[0].index, 1);
    assert_eq!(d.rejects[0].stage, RejectStage::Decode);
    assert!(
        d.rejects[0].error.contains("fast"),
        "{}",
        d.rejects[0].error
    );
    let speeds = d
        .batch
        .column_by_name("speed_kmh")
        .expect("speed")
        .as_primitive::<Float64Type>();
    assert_eq!(speeds.values().to_vec(), vec![31.5, 40.0]);
}

#[test]
fn truncated_json_is_rejected_and_does_not_swallow_the_next_record() {
    let d = camera_decoder()
        .decode(&raw(&[&GOOD[..40], GOOD2]))
        .expect("decode");
    assert_eq!(d.rows, vec![1]);
    assert_eq!(d.rejects[0].index, 0);
    assert!(
        d.rejects[0].error.contains("truncated"),
        "{}",
        d.rejects[0].error
    );
}

#[test]
fn empty_payload_is_rejected() {
    let r = reject_of(&[GOOD, b""]);
    assert_eq!(r.index, 1);
    assert!(r.error.contains("empty"), "{}", r.error);
}

#[test]
fn non_utf8_bytes_are_rejected() {
    let mut bad = GOOD.to_vec();
    bad[16] = 0xff; // inside the camera_id string
    let d = camera_decoder()
        .decode(&raw(&[GOOD, &bad, GOOD2]))
        .expect("decode");
    assert_eq!(d.rows, vec![0, 2]);
    assert_eq!(d.rejects.len(), 1);
    assert!(
        d.rejects[0].error.contains("UTF-8"),
        "{}",
        d.rejects[0].error
    );
    let r = reject_of(&[&[0xff, 0xfe, b'{', 0x80, b'}']]);
    assert_eq!(r.stage, RejectStage::Decode);
}

#[test]
fn unknown_enum_symbol_is_rejected() {
    let bad = br#"{"camera_id":"c","segment_id":"s","event_time":1,"confidence":0.5,"vehicle_class":"hovercraft"}"#;
    let r = reject_of(&[bad, GOOD]);
    assert_eq!(r.index, 0);
    assert_eq!(r.stage, RejectStage::Validate);
    assert!(
        r.error
            .starts_with("field vehicle_class: unknown symbol \"hovercraft\""),
        "{}",
        r.error
    );
}

#[test]
fn two_objects_in_one_record_are_rejected() {
    let two = [GOOD, GOOD2].concat();
    let r = reject_of(&[&two, GOOD]);
    assert_eq!(r.index, 0);
    assert!(r.error.contains("more than one"), "{}", r.error);
}

#[test]
fn non_object_is_rejected() {
    for bad in [&b"[1,2,3]"[..], b"42", b"\"text\"", b"{]"] {
        let d = camera_decoder().decode(&raw(&[bad, GOOD])).expect("decode");
        assert_eq!(d.rows, vec![1], "{:?}", String::from_utf8_lossy(bad));
        assert_eq!(d.rejects.len(), 1);
    }
}

#[test]
fn timestamps_as_rfc3339_strings_are_accepted() {
    let v =
        br#"{"camera_id":"c","segment_id":"s","event_time":"2026-01-01T00:00:00Z","confidence":1}"#;
    let d = camera_decoder().decode(&raw(&[v])).expect("decode");
    assert!(d.rejects.is_empty(), "{:?}", d.rejects);
    let t = d.batch.column_by_name("event_time").expect("time");
    let t = t
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .expect("ts");
    assert_eq!(t.value(0), 1_767_225_600_000);
}

#[test]
fn large_mixed_batch_keeps_every_good_record_in_order() {
    let bad: [&[u8]; 4] = [
        b"{",
        br#"{"camera_id":1}"#,
        b"",
        br#"{"camera_id":"c","segment_id":"s","event_time":1,"confidence":"x"}"#,
    ];
    let mut values: Vec<&[u8]> = Vec::new();
    let mut expected_good = Vec::new();
    for i in 0..5000 {
        if i % 10 == 3 {
            values.push(bad[i / 10 % 4]);
        } else {
            expected_good.push(i as u32);
            values.push(if i % 2 == 0 { GOOD } else { GOOD2 });
        }
    }
    let d = camera_decoder().decode(&raw(&values)).expect("decode");
    assert_eq!(d.rows, expected_good);
    assert_eq!(d.batch.num_rows(), expected_good.len());
    assert_eq!(d.rejects.len(), 500);
    assert!(d.rejects.iter().all(|r| r.index % 10 == 3));
}

#[test]
fn empty_batch_decodes_to_empty() {
    let d = camera_decoder().decode(&raw(&[])).expect("decode");
    assert_eq!(d.batch.num_rows(), 0);
    assert!(d.rejects.is_empty());
}

/// Regression: a table whose event time is a JSON number of epoch seconds was read as
/// milliseconds (an event of 1970, late for every window) without a word. With
/// `'event_time_unit' 's'` the numbers are seconds; without it such records are rejected
/// with a hint about the unit.
#[test]
fn event_time_units_are_declared_and_mistakes_are_named() {
    use datafusion::arrow::datatypes::TimeUnit;
    let schema = Arc::new(TopicSchema::from_arrow(
        "readings",
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
        ])),
    ));
    let seconds: &[u8] = br#"{"id":"a","ts":1767222000}"#;
    let text: &[u8] = br#"{"id":"b","ts":"2026-01-01T00:00:01Z"}"#;
    let decoded = JsonDecoder::new(schema.clone())
        .with_event_time("ts", TimeUnit::Second)
        .decode(&raw(&[seconds, text]))
        .expect("decode");
    assert!(decoded.rejects.is_empty(), "{:?}", decoded.rejects);
    let ts = decoded
        .batch
        .column(1)
        .as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
    assert_eq!(ts.value(0), 1_767_222_000_000);
    assert_eq!(ts.value(1), 1_767_225_601_000);
    assert_eq!(
        decoded.batch.schema().field(1).data_type(),
        &DataType::Timestamp(TimeUnit::Millisecond, None)
    );

    let micros: &[u8] = br#"{"id":"c","ts":1767222000000000}"#;
    let decoded = JsonDecoder::new(schema.clone())
        .with_event_time("ts", TimeUnit::Microsecond)
        .decode(&raw(&[micros]))
        .expect("decode");
    let ts = decoded
        .batch
        .column(1)
        .as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
    assert_eq!(ts.value(0), 1_767_222_000_000);

    // Seconds read as milliseconds: rejected, naming the option.
    let decoded = JsonDecoder::new(schema)
        .with_event_time("ts", TimeUnit::Millisecond)
        .decode(&raw(&[seconds]))
        .expect("decode");
    assert_eq!(decoded.batch.num_rows(), 0);
    assert!(
        decoded.rejects[0].error.contains("'event_time_unit' 's'"),
        "{:?}",
        decoded.rejects
    );
}

/// An event time after the year 9999, or one of epoch seconds too large for milliseconds,
/// is dead-lettered with its number, and the records around it are kept (the seconds once
/// converted to a null in a NOT NULL column and failed the whole batch).
#[test]
fn event_times_beyond_the_year_9999_are_dead_lettered_alone() {
    use datafusion::arrow::datatypes::TimeUnit;
    let schema = Arc::new(TopicSchema::from_arrow(
        "readings",
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
        ])),
    ));
    let good: &[u8] = br#"{"id":"a","ts":1767222000}"#;
    let year_10000: &[u8] = br#"{"id":"b","ts":253402300800}"#;
    let too_large: &[u8] = br#"{"id":"c","ts":9000000000000000000}"#;
    let decoded = JsonDecoder::new(schema.clone())
        .with_event_time("ts", TimeUnit::Second)
        .decode(&raw(&[good, year_10000, too_large, good]))
        .expect("decode");
    assert_eq!(decoded.batch.num_rows(), 2);
    assert_eq!(decoded.rows, vec![0, 3]);
    let rejected: Vec<(u32, &str)> = decoded
        .rejects
        .iter()
        .map(|r| (r.index, r.error.as_str()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            (
                1,
                "field ts: event time 253402300800 is outside the years 1990 to 9999"
            ),
            (
                2,
                "field ts: event time 9000000000000000000 is outside the years 1990 to 9999"
            ),
        ]
    );

    let max: &[u8] = br#"{"id":"d","ts":9223372036854775807}"#;
    let decoded = JsonDecoder::new(schema)
        .with_event_time("ts", TimeUnit::Millisecond)
        .decode(&raw(&[max]))
        .expect("decode");
    assert_eq!(decoded.batch.num_rows(), 0);
    assert_eq!(decoded.rejects.len(), 1);
}

#[test]
fn unknown_ids_are_counted_and_dead_lettered_by_policy() {
    let bad: &[u8] = b"{not json";
    let ids: std::collections::HashSet<String> = ["cam-0001".to_string()].into();
    for policy in [UnknownIds::Process, UnknownIds::DeadLetter] {
        // Records: a malformed one, a known camera, an unknown camera.
        let mut d = camera_decoder()
            .decode(&raw(&[bad, GOOD, GOOD2]))
            .expect("decode");
        let unknown = d
            .check_ids("camera_id", &ids, "cameras", 3, policy)
            .expect("check");
        assert_eq!(unknown, 1);
        match policy {
            UnknownIds::Process => {
                assert_eq!(d.batch.num_rows(), 2);
                assert_eq!(d.rows, vec![1, 2]);
                assert_eq!(d.rejects.len(), 1);
            }
            UnknownIds::DeadLetter => {
                assert_eq!(d.batch.num_rows(), 1);
                assert_eq!(d.rows, vec![1]);
                let ids: Vec<u32> = d.rejects.iter().map(|r| r.index).collect();
                assert_eq!(ids, vec![0, 2], "in input order");
                let r = &d.rejects[1];
                assert_eq!(r.stage, RejectStage::Reference);
                assert!(
                    r.error.contains("\"cam-0002\"")
                        && r.error.contains("cameras (version 3)")
                        && r.error.contains("urbanstream table replace cameras"),
                    "{}",
                    r.error
                );
                let camera = d.batch.column_by_name("camera_id").expect("camera");
                assert_eq!(camera.as_string::<i32>().value(0), "cam-0001");
            }
        }
    }
}

/// The decoder a stream is read with (`TopicDecoder::new`, as the pipeline and every
/// registered query make it) reads JSON numbers exactly too: it used to leave them to
/// arrow-json, which read a lane of 2.7 as 2 and "NaN" or 1e400 in a DOUBLE as non-finite
/// numbers, all without a word.
#[test]
fn a_streams_json_decoder_reads_numbers_exactly_or_dead_letters() {
    let registry = SchemaRegistry::embedded().expect("schemas");
    let decoder = TopicDecoder::new(
        crate::topics::Format::Json,
        registry.get("camera_event").expect("camera schema"),
        Some(("event_time", TimeUnit::Millisecond)),
        &Codecs::default(),
        None,
    )
    .expect("decoder");
    let good = std::str::from_utf8(GOOD).expect("utf-8");
    let with = |from: &str, to: &str| good.replace(from, to).into_bytes();
    let lane = with(r#""lane":1"#, r#""lane":2.7"#);
    let speed = with(r#""speed_kmh":31.5"#, r#""speed_kmh":"NaN""#);
    let huge = with(r#""speed_kmh":31.5"#, r#""speed_kmh":1e400"#);
    let severity = with(r#""lane":1"#, r#""lane":1,"severity":4.9"#);
    let records: Vec<&[u8]> = vec![GOOD, &lane, &speed, &huge, &severity, GOOD2];
    let decoded = decoder.decode(&raw(&records)).expect("decode");
    assert_eq!(decoded.rows, vec![0, 5], "{:?}", decoded.rejects);
    let rejected: Vec<(u32, &str)> = decoded
        .rejects
        .iter()
        .map(|r| (r.index, r.error.as_str()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, "field lane: 2.7 is not a whole number, as Int32 needs"),
            (
                2,
                "field speed_kmh: the number is not finite or beyond the range of Float64"
            ),
            (
                3,
                "field speed_kmh: the number is not finite or beyond the range of Float64"
            ),
            (
                4,
                "field severity: 4.9 is not a whole number, as Int32 needs"
            ),
        ]
    );
    let lanes = decoded.batch.column_by_name("lane").expect("lane");
    assert_eq!(
        lanes
            .as_primitive::<datafusion::arrow::datatypes::Int32Type>()
            .value(0),
        1
    );
}

/// A JSON number is read exactly or the record is dead-lettered: arrow-json truncated `2.5`
/// in an integer field to 2 and extra decimal places of a DECIMAL, and read a REAL beyond
/// its range as infinity, all without a word.
#[test]
fn json_numbers_are_read_exactly_or_dead_lettered() {
    let schema = Arc::new(TopicSchema::from_arrow(
        "readings",
        Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int32, true),
            Field::new("big", DataType::Int64, true),
            Field::new("u", DataType::UInt64, true),
            Field::new("price", DataType::Decimal128(6, 2), true),
            Field::new("r", DataType::Float32, true),
            Field::new("d", DataType::Float64, true),
        ])),
    ));
    let records: &[&[u8]] = &[
        // Kept: whole numbers in any spelling, exact decimals, finite reals.
        br#"{"n":2,"big":9223372036854775807,"u":18446744073709551615,"price":1234.5,"r":1.5,"d":-2}"#,
        br#"{"n":2.0,"big":"-9223372036854775808","u":1e3,"price":"-9999.99","r":3.4e38,"d":1e300}"#,
        br#"{"n":-7E1,"big":null,"price":0.10,"r":null}"#,
        // Dead-lettered, one reason each.
        br#"{"n":2.5}"#,
        br#"{"big":9223372036854775808}"#,
        br#"{"n":3000000000}"#,
        br#"{"u":-1}"#,
        br#"{"price":1.234}"#,
        br#"{"price":10000}"#,
        br#"{"r":1e40}"#,
        br#"{"d":"NaN"}"#,
        br#"{"big":1.0000000000000001}"#,
    ];
    let decoded = JsonDecoder::new(schema.clone())
        .decode(&raw(records))
        .expect("decode");
    assert_eq!(decoded.rows, vec![0, 1, 2], "{:?}", decoded.rejects);
    let b = &decoded.batch;
    let n = b
        .column(0)
        .as_primitive::<datafusion::arrow::datatypes::Int32Type>();
    assert_eq!((n.value(0), n.value(1), n.value(2)), (2, 2, -70));
    let big = b
        .column(1)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
    assert_eq!((big.value(0), big.value(1)), (i64::MAX, i64::MIN));
    assert!(big.is_null(2));
    let u = b
        .column(2)
        .as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
    assert_eq!((u.value(0), u.value(1)), (u64::MAX, 1000));
    assert_eq!(b.schema().field(3).data_type(), &DataType::Decimal128(6, 2));
    let price = b
        .column(3)
        .as_primitive::<datafusion::arrow::datatypes::Decimal128Type>();
    assert_eq!(
        (price.value(0), price.value(1), price.value(2)),
        (123_450, -999_999, 10)
    );
    let r = b
        .column(4)
        .as_primitive::<datafusion::arrow::datatypes::Float32Type>();
    assert_eq!((r.value(0), r.value(1)), (1.5, 3.4e38));
    let rejected: Vec<(u32, &str)> = decoded
        .rejects
        .iter()
        .map(|r| (r.index, r.error.as_str()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            (3, "field n: 2.5 is not a whole number, as Int32 needs"),
            (
                4,
                "field big: 9223372036854775808 is outside the range of Int64"
            ),
            (5, "field n: 3000000000 is outside the range of Int32"),
            (6, "field u: -1 is outside the range of UInt64"),
            (
                7,
                "field price: 1.234 has more decimal places than Decimal128(6, 2) keeps"
            ),
            (
                8,
                "field price: 10000 has more digits than Decimal128(6, 2) holds"
            ),
            (
                9,
                "field r: the number is not finite or beyond the range of Float32"
            ),
            (
                10,
                "field d: the number is not finite or beyond the range of Float64"
            ),
            (
                11,
                "field big: 1.0000000000000001 is not a whole number, as Int64 needs"
            ),
        ]
    );

    // What no carrier reads is named by the field's own type.
    let unreadable: &[&[u8]] = &[br#"{"n":"abc"}"#, br#"{"big":1e30}"#, br#"{"price":1e50}"#];
    let decoded = JsonDecoder::new(schema)
        .decode(&raw(unreadable))
        .expect("decode");
    let rejected: Vec<&str> = decoded.rejects.iter().map(|r| r.error.as_str()).collect();
    assert_eq!(
        rejected,
        vec![
            "whilst decoding field 'n': failed to parse \"abc\" as Int32",
            "whilst decoding field 'big': failed to parse 1e30 as Int64",
            "Parser error: parse decimal overflow (1e50)",
        ]
    );
}

/// Camera records whose numbers break the schema's ranges (confidence 0 to 1, severity 1 to 5,
/// lane at least 1), between records at the ends of those ranges.
pub(crate) const OUT_OF_RANGE: [&[u8]; 6] = [
    br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"confidence":1}"#,
    br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"confidence":1.7}"#,
    br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"confidence":0,"kind":"collision","severity":5,"lane":1}"#,
    br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"confidence":0.5,"kind":"collision","severity":9}"#,
    br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"confidence":0.5,"lane":0}"#,
    br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"confidence":-0.01}"#,
];

/// The rejections [`OUT_OF_RANGE`] must give, by index.
pub(crate) const OUT_OF_RANGE_REASONS: [(u32, &str); 4] = [
    (1, "field confidence: 1.7 is outside its range, 0 to 1"),
    (3, "field severity: 9 is outside its range, 1 to 5"),
    (4, "field lane: 0 is outside its range, at least 1"),
    (5, "field confidence: -0.01 is outside its range, 0 to 1"),
];

/// Checks that `decoded`, [`OUT_OF_RANGE`] decoded in any format, kept the records in range
/// and rejected the others alone, each at validation with its reason.
pub(crate) fn assert_out_of_range_rejected(decoded: &super::Decoded) {
    assert_eq!(decoded.rows, vec![0, 2]);
    let reasons: Vec<(u32, RejectStage, &str)> = decoded
        .rejects
        .iter()
        .map(|r| (r.index, r.stage, r.error.as_str()))
        .collect();
    let expected: Vec<(u32, RejectStage, &str)> = OUT_OF_RANGE_REASONS
        .iter()
        .map(|(i, why)| (*i, RejectStage::Validate, *why))
        .collect();
    assert_eq!(reasons, expected);
}

#[test]
fn numbers_outside_the_schemas_ranges_are_rejected_alone() {
    let d = camera_decoder()
        .decode(&raw(&OUT_OF_RANGE))
        .expect("decode");
    assert_out_of_range_rejected(&d);
}

#[test]
fn a_schemas_range_is_declared_on_a_number_field_or_refused() {
    let with = |attribute: &str, field_type: &str| {
        crate::schema::TopicSchema::from_avsc(
            "probe",
            &format!(
                r#"{{"type":"record","name":"P","fields":[{{"name":"x","type":{field_type},"urbanstream":{attribute}}}]}}"#
            ),
        )
    };
    let ok = with(r#"{"min": 0, "max": 1}"#, r#""double""#).expect("range");
    assert_eq!(
        ok.ranges,
        vec![Some(crate::schema::ValueRange {
            min: Some(0.0),
            max: Some(1.0)
        })]
    );
    for (attribute, field_type, says) in [
        (
            r#"{"min": 2, "max": 1}"#,
            r#""int""#,
            "min (2) is above max (1)",
        ),
        (r#"{}"#, r#""int""#, "give min, max or both"),
        (r#"{"low": 0}"#, r#""int""#, "unknown field `low`"),
        (
            r#"{"min": 0}"#,
            r#""string""#,
            "a range needs a number field",
        ),
    ] {
        let error = with(attribute, field_type)
            .expect_err(attribute)
            .to_string();
        assert!(error.contains("field x: \"urbanstream\": "), "{error}");
        assert!(error.contains(says), "{attribute}: {error}");
    }
}

/// A boolean written as text is the boolean, as a number written as text is the number: a
/// CSV's column of booleans with one other value in it is replayed as texts, and every row
/// of it was dead-lettered. Any other text is not a boolean; the record's other values are
/// read as written.
#[test]
fn a_boolean_written_as_text_is_the_boolean() {
    let schema = Arc::new(TopicSchema::from_arrow(
        "flags",
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("b", DataType::Boolean, true),
            Field::new("big", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
        ])),
    ));
    let records: &[&[u8]] = &[
        br#"{"id":"a","b":true,"big":9007199254740993}"#,
        br#"{"id":"b","b":"true","big":9007199254740993,"note":"true"}"#,
        br#"{"id":"c","big":-9223372036854775808,"b":" FALSE "}"#,
        br#"{"id":"d","b":"yes"}"#,
        br#"{"id":"e","b":"1"}"#,
        br#"{"id":"f","b":false,"note":true}"#,
        br#"{"id":7,"b":false}"#,
    ];
    let decoded = JsonDecoder::new(schema.clone())
        .decode(&raw(records))
        .expect("decode");
    assert_eq!(decoded.rows, vec![0, 1, 2], "{:?}", decoded.rejects);
    let rejected: Vec<u32> = decoded.rejects.iter().map(|r| r.index).collect();
    assert_eq!(rejected, vec![3, 4, 5, 6], "{:?}", decoded.rejects);
    assert!(
        decoded.rejects[0].error.contains("yes"),
        "{}",
        decoded.rejects[0].error
    );
    let b = decoded.batch.column(1).as_boolean();
    assert_eq!((b.value(0), b.value(1), b.value(2)), (true, true, false));
    let big = decoded
        .batch
        .column(2)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
    assert_eq!(
        (big.value(0), big.value(1), big.value(2)),
        (9_007_199_254_740_993, 9_007_199_254_740_993, i64::MIN)
    );
    assert_eq!(decoded.batch.column(3).as_string::<i32>().value(1), "true");
    // `urbanstream run` reads a CSV's booleans by the same rule.
    assert_eq!(
        ["true", " FALSE ", "True", "yes", "1", "on", ""].map(boolean_text),
        [Some(true), Some(false), Some(true), None, None, None, None]
    );
    // A topic whose every record writes its booleans as text decodes in one piece.
    let texts: Vec<Vec<u8>> = (0..100)
        .map(|i| format!(r#"{{"id":"r{i}","b":"{}","big":{i}}}"#, i % 2 == 0).into_bytes())
        .collect();
    let texts: Vec<&[u8]> = texts.iter().map(Vec::as_slice).collect();
    let all = JsonDecoder::new(schema)
        .decode(&raw(&texts))
        .expect("decode");
    assert!(all.rejects.is_empty(), "{:?}", all.rejects);
    let b = all.batch.column(1).as_boolean();
    assert!((0..100).all(|i| b.value(i) == (i % 2 == 0)));
}

/// A number written as text with spaces around it (`" 42 "`, as `replay` writes a CSV's
/// `a, 42 ,b`) is the number in every number field: a DOUBLE's was read, an integer's or a
/// DECIMAL's dead-lettered ("can't parse the string value  42  to decimal"), where
/// `urbanstream run` and previews read the CSV's numbers without the spaces. Text that is no
/// number, spaces or not, is still refused.
#[test]
fn a_number_written_as_text_with_spaces_around_it_is_the_number() {
    let schema = Arc::new(TopicSchema::from_arrow(
        "spaced",
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("i", DataType::Int64, true),
            Field::new("n", DataType::Int32, true),
            Field::new("d", DataType::Decimal128(10, 2), true),
            Field::new("v", DataType::Float64, true),
            Field::new("note", DataType::Utf8, true),
        ])),
    ));
    let records: &[&[u8]] = &[
        br#"{"id":"a","i":" 42 ","n":"7","d":" 1.50","v":"  3.5  ","note":" 9 "}"#,
        br#"{"id":"b","i":43,"n":" -8","d":2.25,"v":4}"#,
        br#"{"id":"c","i":" 4 2 "}"#,
        br#"{"id":"d","i":"   "}"#,
        br#"{"id":"e","n":" 1.5 "}"#,
    ];
    let decoded = JsonDecoder::new(schema)
        .decode(&raw(records))
        .expect("decode");
    assert_eq!(decoded.rows, vec![0, 1], "{:?}", decoded.rejects);
    let rejected: Vec<u32> = decoded.rejects.iter().map(|r| r.index).collect();
    assert_eq!(rejected, vec![2, 3, 4], "{:?}", decoded.rejects);
    let i = decoded
        .batch
        .column(1)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
    let n = decoded
        .batch
        .column(2)
        .as_primitive::<datafusion::arrow::datatypes::Int32Type>();
    let d = decoded
        .batch
        .column(3)
        .as_primitive::<datafusion::arrow::datatypes::Decimal128Type>();
    let v = decoded.batch.column(4).as_primitive::<Float64Type>();
    assert_eq!((i.value(0), i.value(1)), (42, 43));
    assert_eq!((n.value(0), n.value(1)), (7, -8));
    assert_eq!((d.value(0), d.value(1)), (150, 225));
    assert_eq!((v.value(0), v.value(1)), (3.5, 4.0));
    // A text field keeps its spaces.
    assert_eq!(decoded.batch.column(5).as_string::<i32>().value(0), " 9 ");
}

/// A record nested far deeper than any schema (`[[[…]]]` 40 000 deep, 80 KB: within the
/// record size limit) is rejected like any malformed record: it overflowed the stack of the
/// query's thread, and the process aborted again on every restart.
#[test]
fn a_record_nested_deeper_than_any_schema_is_rejected() {
    let handle = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(|| {
            for depth in [1_000, 40_000, 120_000] {
                let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
                let inside = format!(
                    "{{\"camera_id\":\"c1\",\"segment_id\":\"s1\",\"event_time\":1767222000000,\
                     \"kind\":\"detection\",\"x\":{arrays}}}"
                );
                for record in [arrays.as_str(), objects.as_str(), inside.as_str()] {
                    let d = camera_decoder()
                        .decode(&raw(&[GOOD, record.as_bytes(), GOOD2]))
                        .expect("decoded");
                    assert_eq!(d.batch.num_rows(), 2, "{depth}");
                    assert_eq!(d.rejects.len(), 1, "{depth}");
                    // (Or, when larger than a record may be, for its size.)
                    if depth > MAX_JSON_DEPTH {
                        let error = &d.rejects[0].error;
                        assert!(
                            error.contains(&format!("more than {MAX_JSON_DEPTH} deep"))
                                || (record.len() > 262_144 && error.contains("over the limit")),
                            "{depth}: {}",
                            d.rejects[0].error
                        );
                    }
                }
            }
        })
        .expect("thread");
    handle.join().expect("no overflow");
}

/// A record passes the key check when it has a key, whatever its bytes (its segment's text,
/// quoted, a Confluent-framed Avro string, another value: encodings vary, and any keeps a
/// group together); one without a key is rejected (stage validate, naming the column and its
/// value), and the others stay in order.
#[test]
fn records_without_a_key_are_rejected_by_the_key_check() {
    let mut avro_key = vec![0, 0, 0, 0, 7, 16];
    avro_key.extend_from_slice(b"kim_ma_w");
    let keys: [Option<&[u8]>; 6] = [
        Some(b"kim_ma_w"),
        Some(b"\"kim_ma_w\""),
        Some(&avro_key),
        None,
        Some(b"cam-0001"),
        Some(b""),
    ];
    let mut raw = RawBatch::new("city.camera.events");
    for (i, key) in keys.iter().enumerate() {
        raw.push(1, 10 + i as i64, *key, Some(GOOD));
    }
    let mut decoded = camera_decoder().decode(&raw).expect("decode");
    let unkeyed = decoded
        .check_keys(&raw, "segment_id", "city.camera.events")
        .expect("check");
    assert_eq!(unkeyed, 1);
    assert_eq!(decoded.rows, vec![0, 1, 2, 4, 5]);
    assert_eq!(decoded.batch.num_rows(), 5);
    let rejected: Vec<(u32, RejectStage)> =
        decoded.rejects.iter().map(|r| (r.index, r.stage)).collect();
    assert_eq!(rejected, [(3, RejectStage::Validate)]);
    assert!(
        decoded.rejects[0]
            .error
            .starts_with("record without a key, where city.camera.events is declared keyed by segment_id (\"kim_ma_w\")"),
        "{}",
        decoded.rejects[0].error
    );
}

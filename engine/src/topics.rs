//! The names of the topics the engine reads and writes, below every layer that uses them
//! (planning, the pipeline, configuration).

/// How a topic's records are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per record (event times as epoch milliseconds or RFC 3339).
    #[default]
    Json,
    /// Avro in the Confluent wire format: magic byte 0, the writer schema's id in the schema
    /// registry (4 bytes, big-endian), the Avro binary body.
    Avro,
    /// A Protobuf message, plain or in the Confluent wire format, read by reflection over its
    /// descriptor (inputs only).
    Protobuf,
}

impl Format {
    /// Its name in options and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
            Format::Protobuf => "protobuf",
        }
    }

    /// Parses `json`, `avro` or `protobuf` (any case).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "json" => Some(Format::Json),
            "avro" => Some(Format::Avro),
            "protobuf" => Some(Format::Protobuf),
            _ => None,
        }
    }
}

/// Topic names. All configurable (`[topics]` of the service's configuration); the defaults
/// are the city's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    /// Camera events (input).
    pub camera: String,
    /// Detector readings (input).
    pub detectors: String,
    /// Air readings (input).
    pub air: String,
    /// Congestion indicators (output).
    pub congestion: String,
    /// Air indicators (output).
    pub air_indicators: String,
    /// The most congested segments per ward and minute (output).
    pub congestion_top: String,
    /// Camera-to-camera travel times per segment (output).
    pub travel: String,
    /// Alerts (output).
    pub alerts: String,
    /// Dead-letter queue (output).
    pub dlq: String,
    /// Late events (output).
    pub late: String,
    /// How the input topics' records are encoded (camera, detectors, air).
    #[serde(default)]
    pub input_format: Format,
    /// How the indicator and alert topics' records are written (the DLQ and the late topic
    /// are JSON).
    #[serde(default)]
    pub output_format: Format,
    /// Topics of the other streams declared by schema files (`schemas/topics/*.avsc`), by
    /// table name, where they are not the topic the file declares.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub streams: std::collections::BTreeMap<String, String>,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            camera: "city.camera.events".into(),
            detectors: "city.traffic.detectors".into(),
            air: "city.air.readings".into(),
            congestion: "city.indicators.congestion".into(),
            air_indicators: "city.indicators.air".into(),
            congestion_top: "city.indicators.congestion.top".into(),
            travel: "city.indicators.travel".into(),
            alerts: "city.alerts".into(),
            dlq: "city.dlq".into(),
            late: "city.late".into(),
            input_format: Format::Json,
            output_format: Format::Json,
            streams: Default::default(),
        }
    }
}

impl Topics {
    /// The topic of the stream a schema file declares: the field above for the city's first
    /// streams, else its entry in `streams`, else the topic the file declares.
    pub fn topic_of(&self, declared: &crate::schema::StreamDeclaration) -> String {
        let fixed = match declared.table.as_str() {
            "camera_events" => Some(&self.camera),
            "detector_readings" => Some(&self.detectors),
            "air_readings" => Some(&self.air),
            "congestion_indicators" => Some(&self.congestion),
            "air_indicators" => Some(&self.air_indicators),
            "congestion_top" => Some(&self.congestion_top),
            "travel_times" => Some(&self.travel),
            "alerts" => Some(&self.alerts),
            _ => None,
        };
        fixed
            .or_else(|| self.streams.get(&declared.table))
            .cloned()
            .unwrap_or_else(|| declared.topic.clone())
    }

    /// Every topic of the streams `schemas` declare, inputs first, then the DLQ and the late
    /// topic: what a deployment creates.
    pub fn declared(
        &self,
        schemas: &crate::schema::SchemaRegistry,
    ) -> crate::error::Result<Vec<String>> {
        use crate::schema::StreamRole;
        let streams = schemas.streams()?;
        let mut all = Vec::new();
        for role in [StreamRole::Input, StreamRole::Output] {
            all.extend(
                streams
                    .iter()
                    .filter(|(_, d)| d.role == role)
                    .map(|(_, d)| self.topic_of(d)),
            );
        }
        all.extend([self.dlq.clone(), self.late.clone()]);
        Ok(all)
    }

    /// The topic of the stream a schema file compiled in declares as `table`.
    pub fn topic_of_table(&self, table: &str) -> Option<String> {
        let streams = crate::schema::SchemaRegistry::embedded()
            .and_then(|s| s.streams())
            .ok()?;
        streams
            .iter()
            .find(|(_, d)| d.table == table)
            .map(|(_, d)| self.topic_of(d))
    }

    /// The input topics: of every input stream the schema files compiled in declare.
    pub fn inputs(&self) -> Vec<String> {
        let fixed = || {
            vec![
                self.camera.clone(),
                self.detectors.clone(),
                self.air.clone(),
            ]
        };
        match crate::schema::SchemaRegistry::embedded().and_then(|s| s.streams()) {
            Ok(streams) => streams
                .iter()
                .filter(|(_, d)| d.role == crate::schema::StreamRole::Input)
                .map(|(_, d)| self.topic_of(d))
                .collect(),
            Err(_) => fixed(),
        }
    }

    /// Every topic of the streams the schema files compiled in declare, inputs first, then
    /// the DLQ and the late topic: what a deployment creates.
    pub fn all(&self) -> Vec<String> {
        let fixed = || {
            vec![
                self.camera.clone(),
                self.detectors.clone(),
                self.air.clone(),
                self.congestion.clone(),
                self.air_indicators.clone(),
                self.congestion_top.clone(),
                self.travel.clone(),
                self.alerts.clone(),
                self.dlq.clone(),
                self.late.clone(),
            ]
        };
        // The embedded schemas parse (their tests say so); the city's first topics otherwise.
        crate::schema::SchemaRegistry::embedded()
            .and_then(|schemas| self.declared(&schemas))
            .unwrap_or_else(|_| fixed())
    }
}

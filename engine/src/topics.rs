//! The names of the topics the engine reads and writes, below every layer that uses them
//! (planning, the pipeline, configuration).

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
        }
    }
}

impl Topics {
    /// The input topics.
    pub fn inputs(&self) -> Vec<String> {
        vec![
            self.camera.clone(),
            self.detectors.clone(),
            self.air.clone(),
        ]
    }

    /// Every topic, inputs first.
    pub fn all(&self) -> Vec<String> {
        let mut all = self.inputs();
        all.extend([
            self.congestion.clone(),
            self.air_indicators.clone(),
            self.congestion_top.clone(),
            self.travel.clone(),
            self.alerts.clone(),
            self.dlq.clone(),
            self.late.clone(),
        ]);
        all
    }
}

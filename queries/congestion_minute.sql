-- Congestion indicators per road segment and minute, from camera detections.
-- Published to city.indicators.congestion, keyed by segment_id, when event time passes the
-- end of each minute (watermark: largest event time seen minus 5 s).
INSERT INTO congestion_indicators
SELECT segment_id,
       window_start,
       window_end,
       count(*) AS vehicles,
       avg(speed_kmh) AS mean_speed_kmh,
       avg(CASE WHEN vehicle_class = 'motorbike' THEN 1.0 ELSE 0.0 END) AS motorbike_share
FROM camera_events
WHERE kind = 'detection'
GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id;

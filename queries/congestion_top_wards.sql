-- The five most congested road segments of each ward, each minute: per segment and minute
-- the travel time index (free-flow speed over the space-mean speed of its detections),
-- ranked within the ward (Flink's window Top-N: ranked over every segment of the ward's
-- minute when the minute closes). Published to city.indicators.congestion.top, keyed by
-- ward_id.
INSERT INTO congestion_top
SELECT ward_id, window_start, window_end, place, segment_id, tti, mean_speed_kmh, vehicles
FROM (
    SELECT *,
           ROW_NUMBER() OVER (PARTITION BY window_start, ward_id
                              ORDER BY tti DESC NULLS LAST, segment_id) AS place
    FROM (
        SELECT s.ward_id, c.segment_id, window_start, window_end, count(*) AS vehicles,
               space_mean_speed(c.speed_kmh) AS mean_speed_kmh,
               tti(max(s.free_flow_kmh), space_mean_speed(c.speed_kmh)) AS tti
        FROM camera_events c JOIN segments s ON c.segment_id = s.segment_id
        WHERE c.kind = 'detection'
        GROUP BY tumble(c.event_time, INTERVAL '1 minute'), s.ward_id, c.segment_id
    )
)
WHERE place <= 5;

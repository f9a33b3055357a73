-- Flooded roads: a road gauge's 5-minute water indicators joined with the congestion
-- indicators of the segment it watches in the same five minutes (a stream-stream left join of
-- two indicator topics, bounded in event time), so the operator sees what the water does to
-- the traffic: the slowest minute's speed and the worst level of service. The water drives
-- the alert: a road with no traffic measured in the window (flooded past passing, or without
-- cameras) is still flooded, and says so. Raised on the first window at warning level I or
-- above, UPDATED as the warning level changes, cleared on the first window below level I
-- (or 15 minutes after the gauge's last data). Severity 2 at level I, 3 at II, 4 at III.
-- Each window is published once the join has seen the traffic of its five minutes: about
-- ten minutes after its end.
-- Published to city.alerts (kind flooded_road), keyed by entity_id.
INSERT INTO alerts
SELECT concat('flooded_road:', segment_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'flooded_road' AS kind,
       'segment' AS entity_type,
       segment_id AS entity_id,
       ward_id,
       'water level_cm, space_mean_speed_kmh, los' AS metric,
       level AS value,
       CAST(NULL AS DOUBLE) AS baseline,
       CAST(warning AS DOUBLE) AS score,
       'gauge + congestion indicators' AS detector,
       'a gauge at warning level I or above raises (with its segment''s traffic in the same 5 minutes); below level I clears' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       CAST(greatest(2, 1 + warning) AS INT) AS severity,
       concat('Water ', round(level, 1), ' cm (level ', warning, ') at ', gauges, ': ',
              CASE WHEN los IS NULL THEN 'no traffic measured in the five minutes'
                   ELSE concat('traffic ', round(speed, 1), ' km/h, level of service ', los)
              END) AS message
FROM (
    SELECT *,
           alert_state(CAST(warning AS DOUBLE), window_end, 1, 0.5, INTERVAL '0 minutes',
                       INTERVAL '0 minutes', INTERVAL '15 minutes')
               OVER (PARTITION BY segment_id ORDER BY window_end) AS a
    FROM (
        SELECT w.segment_id, max(w.ward_id) AS ward_id, window.window_start AS window_start,
               window.window_end AS window_end,
               max(w.max_level_cm) AS level, max(w.warning_level) AS warning,
               string_agg(DISTINCT w.gauge_id, ', ') AS gauges,
               min(c.space_mean_speed_kmh) AS speed, max(c.los) AS los
        FROM (SELECT gauge_id, ward_id, segment_id, window_start AS five, max_level_cm,
                     warning_level
              FROM water_indicators WHERE segment_id IS NOT NULL) w
        LEFT JOIN (SELECT segment_id, window_start AS minute, space_mean_speed_kmh, los
              FROM congestion_indicators) c
          ON w.segment_id = c.segment_id
         AND c.minute BETWEEN w.five AND w.five + INTERVAL '4 minutes'
        GROUP BY tumble(w.five, INTERVAL '5 minutes'), w.segment_id
    )
)
WHERE a['state'] IS NOT NULL;

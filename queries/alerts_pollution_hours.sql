-- Pollution episodes per ward by the consecutive-hours rule: the ward's hourly PM2.5 (mean
-- of its sensors' valid readings) as a VN_AQI sub-index; an episode is raised at the end of
-- the third consecutive hour above 150 (Xấu, poor), and cleared at the end of the first hour
-- at or below 150 after it. Consecutive means the three hours follow each other: a ward
-- silent for an hour has no row for it, so lag(window_end, 2) must be two hours back.
-- Published to city.alerts (kind pollution_episode_3h), keyed by entity_id.
INSERT INTO alerts
SELECT concat('pollution_episode_3h:', ward_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'pollution_episode_3h' AS kind,
       'ward' AS entity_type,
       ward_id AS entity_id,
       ward_id,
       'pm25_hourly_aqi' AS metric,
       pm25 AS value,
       CAST(150.0 AS DOUBLE) AS baseline,
       aqi AS score,
       'vn_aqi_sub' AS detector,
       'hourly PM2.5 sub-index > 150 in three consecutive hours raises; an hour <= 150 clears' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat('PM2.5 ', round(pm25, 1), ' µg/m³ in the hour to ', to_char(window_end, '%H:%M'),
              ' UTC (AQI ', aqi, '); the hours before: AQI ', aqi_1, ', ', aqi_2) AS message
FROM (
    SELECT *,
           alert_state(CASE WHEN run THEN aqi WHEN aqi > 150 THEN 150.5 ELSE aqi END,
                       window_end, 150.75, 150)
               OVER (PARTITION BY ward_id ORDER BY window_end) AS a
    FROM (
        SELECT *,
               aqi > 150 AND aqi_1 > 150 AND aqi_2 > 150
                 AND end_2 = window_end - INTERVAL '2 hours' AS run
        FROM (
            SELECT ward_id, window_start, window_end, pm25, aqi,
                   lag(aqi, 1) OVER w AS aqi_1,
                   lag(aqi, 2) OVER w AS aqi_2,
                   lag(window_end, 2) OVER w AS end_2
            FROM (
                SELECT ward_id, window_start, window_end, pm25,
                       CAST(vn_aqi_sub('pm25', pm25) AS DOUBLE) AS aqi
                FROM (
                    SELECT ward_id, window_start, window_end,
                           avg(pm25) FILTER (WHERE reading_valid('pm25', pm25)) AS pm25
                    FROM air_readings
                    GROUP BY tumble(event_time, INTERVAL '1 hour'), ward_id
                )
                WHERE pm25 IS NOT NULL
            )
            WINDOW w AS (PARTITION BY ward_id ORDER BY window_end)
        )
    )
)
WHERE a['state'] IS NOT NULL;

-- Pollution episodes per ward: the ward's PM2.5 over 10 minutes (mean over its sensors'
-- valid readings) as a VN_AQI sub-index; an episode is raised when it stays above 150 (Xấu,
-- poor) for 30 minutes, cleared when it falls to 100 or below, with an hour's cooldown, and
-- expires when the ward stops reporting for 2 hours. UPDATED when its severity changes.
-- Published to city.alerts (kind pollution_episode), keyed by entity_id.
INSERT INTO alerts
SELECT concat('pollution_episode:', ward_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'pollution_episode' AS kind,
       'ward' AS entity_type,
       ward_id AS entity_id,
       ward_id,
       'pm25_10min_aqi' AS metric,
       pm25 AS value,
       CAST(150.0 AS DOUBLE) AS baseline,
       aqi AS score,
       'vn_aqi_sub' AS detector,
       'PM2.5 sub-index > 150 for 30 min raises, <= 100 clears; cooldown 1 h; expires after 2 h without data' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat('PM2.5 ', round(pm25, 1), ' µg/m³ over 10 minutes (AQI ', aqi, ', peak ',
              a['peak'], ')') AS message
FROM (
    SELECT *,
           alert_state(aqi, window_end, 151, 100, INTERVAL '30 minutes', INTERVAL '1 hour',
                       INTERVAL '2 hours')
               OVER (PARTITION BY ward_id ORDER BY window_end) AS a
    FROM (
        SELECT ward_id, window_start, window_end, pm25,
               CAST(vn_aqi_sub('pm25', pm25) AS DOUBLE) AS aqi
        FROM (
            SELECT ward_id, window_start, window_end,
                   avg(pm25) FILTER (WHERE reading_valid('pm25', pm25)) AS pm25
            FROM air_readings
            GROUP BY tumble(event_time, INTERVAL '10 minutes'), ward_id
        )
    )
)
WHERE a['state'] IS NOT NULL;

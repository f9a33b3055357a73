-- Citizens' reports confirmed by the sensors: a report from the city's app joined with the
-- alerts of a matching kind raised or updated in the same ward from 30 minutes before the
-- report to 10 minutes after it (a stream-stream join, bounded in event time): flooding with
-- flood warnings and flooded roads; pollution with pollution episodes; accidents and
-- congestion with the traffic alerts that name a ward (flooded roads, congestion anomalies,
-- incidents). Per ward and 10 minutes of reports: raised with the reports and the alerts cited,
-- at the severity of the worst alert cited (UPDATED as more reports come), expired an hour
-- after the last confirmation.
-- The alerts topic carries changes, not states: an alert raised more than 30 minutes before
-- the report and unchanged since does not confirm it, and one cleared between its RAISED and
-- the report still does. Sensor-fault alerts and confirmed incidents carry no ward yet.
-- Published to city.alerts (kind report_confirmed), keyed by entity_id.
INSERT INTO alerts
SELECT concat('report_confirmed:', ward_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'report_confirmed' AS kind,
       'ward' AS entity_type,
       ward_id AS entity_id,
       ward_id,
       'citizen reports, sensor alerts' AS metric,
       CAST(reports AS DOUBLE) AS value,
       CAST(NULL AS DOUBLE) AS baseline,
       CAST(reports AS DOUBLE) AS score,
       'citizen reports + alerts' AS detector,
       'a report and an alert of a matching kind in its ward from 30 min before to 10 min after it raise; cleared 1 h after the last' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       coalesce(worst, 2) AS severity,
       concat(reports, ' citizen report(s) (', report_ids, ': ', texts, ') confirmed by ',
              alert_ids) AS message
FROM (
    SELECT *,
           alert_state(CAST(reports AS DOUBLE), window_end, 1, 0, INTERVAL '0 minutes',
                       INTERVAL '0 minutes', INTERVAL '1 hour')
               OVER (PARTITION BY ward_id ORDER BY window_end) AS a
    FROM (
        SELECT r.ward_id, window.window_start AS window_start,
               window.window_end AS window_end,
               count(DISTINCT r.report_id) AS reports,
               string_agg(DISTINCT concat(r.report_id, ' ', r.category), ', ') AS report_ids,
               string_agg(DISTINCT r.text, ' / ') AS texts,
               string_agg(DISTINCT a.alert_id, ', ') AS alert_ids,
               max(a.severity) AS worst
        FROM citizen_reports r
        JOIN (SELECT alert_id, kind, ward_id, window_end AS at, severity
              FROM alerts
              WHERE state <> 'CLEARED' AND kind <> 'report_confirmed') a
          ON r.ward_id = a.ward_id
         AND a.at BETWEEN r.event_time - INTERVAL '30 minutes'
                      AND r.event_time + INTERVAL '10 minutes'
        WHERE (r.category = 'flooding' AND a.kind IN ('flood_warning', 'flooded_road'))
           OR (r.category = 'pollution'
               AND a.kind IN ('pollution_episode', 'pollution_episode_3h'))
           OR (r.category IN ('accident', 'congestion')
               AND a.kind IN ('flooded_road', 'congestion_anomaly', 'incident'))
        GROUP BY tumble(r.event_time, INTERVAL '10 minutes'), r.ward_id
    )
)
WHERE a['state'] IS NOT NULL;

-- Occupancy anomalies per lot or street: each minute's occupancy is scored by the default
-- detector (seasonal daily profile, robust residual scale, CUSUM for shifts) against the lot's
-- own history, and alerted on its calibrated likelihood, one threshold for every lot whatever
-- its size and noise: raised on a minute at likelihood 0.9999 or more (about one minute in
-- 10 000 of a lot without anomalies), cleared below 0.99, 30 minutes' cooldown; expires after
-- an hour without data. The likelihood is null while the detector learns a lot (its first 300
-- minutes), which raises nothing. The detector takes a lasting change (a lot closed, a counter
-- stuck) as the lot's new level within minutes, so the alert marks where it began and clears
-- while it may still last. The message gives the usual occupancy, the expected range (the
-- usual ± 3 robust σ) and the likelihood.
-- Published to city.alerts (kind parking_anomaly), keyed by entity_id.
INSERT INTO alerts
SELECT concat('parking_anomaly:', lot_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'parking_anomaly' AS kind,
       'parking_lot' AS entity_type,
       lot_id AS entity_id,
       ward_id,
       'occupancy_pct' AS metric,
       occupancy AS value,
       d['baseline'] AS baseline,
       d['score'] AS score,
       'anomaly_score' AS detector,
       'occupancy likelihood >= 0.9999 raises, < 0.99 clears; cooldown 30 min; expires after 1 h without data' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat('Occupancy ', round(occupancy, 1), ' % where ', round(d['baseline'], 1),
              ' % is usual at this time (',
              CASE WHEN d['scale'] IS NOT NULL
                   THEN concat('expected ', round(greatest(d['baseline'] - 3 * d['scale'], 0.0), 1),
                               ' to ', round(least(d['baseline'] + 3 * d['scale'], 100.0), 1), ' %; ') END,
              round(d['score'], 1), ' σ; likelihood ',
              coalesce(CAST(round(d['likelihood'], 5) AS VARCHAR), 'not learnt yet'), ')') AS message
FROM (
    SELECT *,
           alert_state(d['likelihood'], window_end, 0.9999, 0.99, INTERVAL '0 minutes',
                       INTERVAL '30 minutes', INTERVAL '1 hour')
               OVER (PARTITION BY lot_id ORDER BY window_end) AS a
    FROM (
        SELECT *,
               anomaly_score(occupancy, window_end, INTERVAL '7 hours')
                   OVER (PARTITION BY lot_id ORDER BY window_end) AS d
        FROM (
            SELECT p.lot_id, coalesce(max(l.ward_id), 'unknown') AS ward_id,
                   window_start, window_end,
                   100.0 * sum(least(p.occupied, p.spaces)) / sum(p.spaces) AS occupancy
            FROM parking_readings p
            LEFT JOIN parking_lots l ON p.lot_id = l.lot_id
            WHERE p.spaces > 0 AND p.occupied >= 0
            GROUP BY tumble(p.event_time, INTERVAL '1 minute'), p.lot_id
        )
    )
)
WHERE a['state'] IS NOT NULL;

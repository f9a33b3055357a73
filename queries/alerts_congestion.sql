-- Congestion anomalies per road segment: the space-mean speed of each minute is scored by the
-- default detector (seasonal daily profile, robust residual scale, CUSUM for shifts) against
-- the segment's own history, and alert_state turns the score into alerts: raised when the
-- speed stays 4 robust σ below what the segment does at that time of day, and at most 70 % of
-- it, for 3 minutes; cleared when it is back within 2 σ or above 80 % of the usual (between 70
-- and 80 % a raised alert holds, a pending one waits), then 10 minutes' cooldown; an alert on a
-- segment that stops reporting (or whose speed is missing) expires after 15 minutes.
-- Scores of a detector still warming up (its first 30 minutes of a segment) raise nothing.
-- The message gives the usual speed, the expected range (the usual ± 3 robust σ; a shift that
-- has lasted scores beyond it even where the minute itself is inside) and the score's
-- calibrated likelihood; a minute without a speed (an alert expiring) says so.
-- The 70 %: the daily profile is kept in 15-minute bins, and where the speed climbs fast
-- within a bin (the end of a rush hour) the first minutes of the bin lie below its mean and
-- the shift part of the score runs up, though the speed is the usual one; on the
-- simulator's days that raised 3.7 false alerts per segment-day once the profile existed
-- (`urbanstream evaluate --alerts`, benches/README.md).
-- Published to city.alerts (kind congestion_anomaly), keyed by entity_id.
INSERT INTO alerts
SELECT concat('congestion_anomaly:', segment_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'congestion_anomaly' AS kind,
       'segment' AS entity_type,
       segment_id AS entity_id,
       ward_id,
       'space_mean_speed_kmh' AS metric,
       speed AS value,
       d['baseline'] AS baseline,
       d['score'] AS score,
       'anomaly_score' AS detector,
       'speed score <= -4 at most 70 % of usual for 3 min raises; >= -2 or above 80 % of usual clears; cooldown 10 min; expires after 15 min without data' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       CASE WHEN speed IS NULL THEN 'No speed measured in the minute'
            ELSE concat('Speed ', round(speed, 1), ' km/h where ', round(d['baseline'], 1),
                        ' km/h is usual at this time (',
                        CASE WHEN d['scale'] IS NOT NULL
                             THEN concat('expected ', round(greatest(d['baseline'] - 3 * d['scale'], 0.0), 1),
                                         ' to ', round(d['baseline'] + 3 * d['scale'], 1), ' km/h; ') END,
                        round(d['score'], 1), ' σ; likelihood ',
                        coalesce(CAST(round(d['likelihood'], 5) AS VARCHAR), 'not learnt yet'), ')') END AS message
FROM (
    SELECT *,
           alert_state(CASE WHEN d['warming'] OR speed IS NULL THEN NULL
                            WHEN speed > 0.8 * d['baseline'] THEN 0.0
                            WHEN speed > 0.7 * d['baseline'] THEN least(-d['score'], 3.0)
                            ELSE -d['score'] END, window_end,
                       4, 2, INTERVAL '3 minutes', INTERVAL '10 minutes', INTERVAL '15 minutes')
               OVER (PARTITION BY segment_id ORDER BY window_end) AS a
    FROM (
        SELECT *,
               anomaly_score(speed, window_end, INTERVAL '7 hours')
                   OVER (PARTITION BY segment_id ORDER BY window_end) AS d
        FROM (
            SELECT c.segment_id, max(s.ward_id) AS ward_id, window_start, window_end,
                   space_mean_speed(c.speed_kmh) AS speed
            FROM camera_events c LEFT JOIN segments s ON c.segment_id = s.segment_id
            WHERE c.kind = 'detection'
            GROUP BY tumble(c.event_time, INTERVAL '1 minute'), c.segment_id
        )
    )
)
WHERE a['state'] IS NOT NULL;

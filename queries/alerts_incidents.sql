-- Traffic incidents per road segment, two ways (both kind incident, told apart by detector):
--
-- 1. Raised directly by camera incident events (stalled vehicle, collision, wrong way,
--    congestion queue) of confidence >= 0.5: raised on the first minute with one, cleared
--    15 minutes after the last.
-- 2. From loop/radar detectors (the California-algorithm family): per segment and minute, the
--    speed collapses (default detector score <= -3, and at most 70 % of the usual speed) while
--    the occupancy rises (score >= 3) against the segment's own profile, for 3 minutes; cleared
--    when either is back within 1.5 σ or the speed above 80 % of the usual (between 70 and
--    80 % a raised alert holds, a pending one waits); a segment whose speed is missing raises
--    nothing and its alert expires after 15 minutes. The message gives each measure's usual
--    value and expected range (the usual ± 3 robust σ) and the speed score's likelihood, or
--    which measure the minute lacks.
--    The 70 % keeps a smooth series' ordinary slowdowns out: on a series with little noise a
--    13 % drop is many σ, and before the daily profile has seen a time of day twice (a new
--    segment's first two days) the morning's rise in traffic looks like a collapse against
--    the night. Measured on the simulator's days with `urbanstream evaluate --alerts`
--    (benches/README.md).
-- Published to city.alerts, keyed by entity_id.
INSERT INTO alerts
SELECT concat('incident:', segment_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'incident' AS kind,
       'segment' AS entity_type,
       segment_id AS entity_id,
       ward_id,
       'camera_incident_events' AS metric,
       CAST(events AS DOUBLE) AS value,
       CAST(0.0 AS DOUBLE) AS baseline,
       CAST(events AS DOUBLE) AS score,
       'camera' AS detector,
       'one incident event (confidence >= 0.5) raises; cleared 15 min after the last' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       greatest(a['severity'], worst) AS severity,
       concat(events, ' camera incident event(s) (', kinds, ') in the minute') AS message
FROM (
    SELECT *,
           alert_state(CAST(events AS DOUBLE), window_end, 1, 0, INTERVAL '0 minutes',
                       INTERVAL '0 minutes', INTERVAL '15 minutes')
               OVER (PARTITION BY segment_id ORDER BY window_end) AS a
    FROM (
        SELECT c.segment_id, max(s.ward_id) AS ward_id, window_start, window_end,
               count(*) AS events, max(c.severity) AS worst,
               string_agg(DISTINCT c.kind, ', ') AS kinds
        FROM camera_events c LEFT JOIN segments s ON c.segment_id = s.segment_id
        WHERE c.kind <> 'detection' AND c.confidence >= 0.5
        GROUP BY tumble(c.event_time, INTERVAL '1 minute'), c.segment_id
    )
)
WHERE a['state'] IS NOT NULL;

INSERT INTO alerts
SELECT concat('incident:', segment_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'incident' AS kind,
       'segment' AS entity_type,
       segment_id AS entity_id,
       ward_id,
       'mean_speed_kmh, occupancy_pct' AS metric,
       speed AS value,
       s['baseline'] AS baseline,
       least(-s['score'], o['score']) AS score,
       'anomaly_score' AS detector,
       'speed score <= -3 at most 70 % of usual and occupancy score >= 3 for 3 min raise; either within 1.5 or speed above 80 % of usual clears' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       CASE WHEN speed IS NULL OR occupancy IS NULL
            THEN concat('No ', CASE WHEN speed IS NULL THEN 'speed' ELSE 'occupancy' END,
                        ' measured in the minute')
            ELSE concat('Speed ', round(speed, 1), ' km/h (usual ', round(s['baseline'], 1),
                        CASE WHEN s['scale'] IS NOT NULL
                             THEN concat(', expected ', round(greatest(s['baseline'] - 3 * s['scale'], 0.0), 1),
                                         ' to ', round(s['baseline'] + 3 * s['scale'], 1)) END,
                        '), occupancy ', round(occupancy, 1), ' % (usual ', round(o['baseline'], 1),
                        CASE WHEN o['scale'] IS NOT NULL
                             THEN concat(', expected ', round(greatest(o['baseline'] - 3 * o['scale'], 0.0), 1),
                                         ' to ', round(least(o['baseline'] + 3 * o['scale'], 100.0), 1)) END,
                        '); likelihood of the speed ',
                        coalesce(CAST(round(s['likelihood'], 5) AS VARCHAR), 'not learnt yet')) END AS message
FROM (
    SELECT *,
           alert_state(CASE WHEN s['warming'] OR o['warming'] OR speed IS NULL THEN NULL
                            WHEN speed > 0.8 * s['baseline'] THEN 0.0
                            WHEN speed > 0.7 * s['baseline'] THEN least(-s['score'], o['score'], 2.0)
                            ELSE least(-s['score'], o['score']) END,
                       window_end, 3, 1.5, INTERVAL '3 minutes', INTERVAL '10 minutes',
                       INTERVAL '15 minutes')
               OVER (PARTITION BY segment_id ORDER BY window_end) AS a
    FROM (
        SELECT *,
               anomaly_score(speed, window_end, INTERVAL '7 hours') OVER w AS s,
               anomaly_score(occupancy, window_end, INTERVAL '7 hours') OVER w AS o
        FROM (
            SELECT d.segment_id, max(s.ward_id) AS ward_id, window_start, window_end,
                   avg(d.mean_speed_kmh) AS speed, avg(d.occupancy_pct) AS occupancy
            FROM detector_readings d LEFT JOIN segments s ON d.segment_id = s.segment_id
            GROUP BY tumble(d.event_time, INTERVAL '1 minute'), d.segment_id
        )
        WINDOW w AS (PARTITION BY segment_id ORDER BY window_end)
    )
)
WHERE a['state'] IS NOT NULL;

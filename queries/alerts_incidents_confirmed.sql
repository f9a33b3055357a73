-- Incidents confirmed by two sources: a camera incident event (stalled vehicle, collision,
-- wrong way, queue; confidence >= 0.5) and, on the same segment within two minutes either
-- side of it, a detector reading of traffic at a crawl (mean speed below 15 km/h or
-- occupancy at 30 % or more). A stream-stream join of the two topics, bounded in event time.
-- Raised on the first minute with a confirmation, cleared 15 minutes after the last.
-- Published to city.alerts (kind incident_confirmed), keyed by entity_id, with the segment's
-- ward.
INSERT INTO alerts
SELECT concat('incident_confirmed:', segment_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'incident_confirmed' AS kind,
       'segment' AS entity_type,
       segment_id AS entity_id,
       'camera_incident_events, detector speed and occupancy' AS metric,
       CAST(confirmations AS DOUBLE) AS value,
       CAST(0.0 AS DOUBLE) AS baseline,
       CAST(confirmations AS DOUBLE) AS score,
       'camera + detector' AS detector,
       'a camera incident event and a crawling detector reading within 2 min raise; cleared 15 min after the last' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       greatest(a['severity'], worst) AS severity,
       concat(kinds, ' seen by camera, confirmed by ', detectors, ' detector(s): ',
              round(speed, 1), ' km/h, occupancy ', round(occupancy, 1), ' %') AS message,
       ward_id
FROM (
    SELECT *,
           alert_state(CAST(confirmations AS DOUBLE), window_end, 1, 0, INTERVAL '0 minutes',
                       INTERVAL '0 minutes', INTERVAL '15 minutes')
               OVER (PARTITION BY segment_id ORDER BY window_end) AS a
    FROM (
        SELECT c.segment_id, max(s.ward_id) AS ward_id, window_start, window_end,
               count(*) AS confirmations,
               max(c.severity) AS worst, string_agg(DISTINCT c.kind, ', ') AS kinds,
               count(DISTINCT d.detector_id) AS detectors,
               min(d.mean_speed_kmh) AS speed, max(d.occupancy_pct) AS occupancy
        FROM camera_events c
        JOIN detector_readings d
          ON c.segment_id = d.segment_id
         AND d.event_time BETWEEN c.event_time - INTERVAL '2 minutes'
                              AND c.event_time + INTERVAL '2 minutes'
        LEFT JOIN segments s ON c.segment_id = s.segment_id
        WHERE c.kind <> 'detection' AND c.confidence >= 0.5
          AND (d.mean_speed_kmh < 15 OR d.occupancy_pct >= 30)
        GROUP BY tumble(c.event_time, INTERVAL '1 minute'), c.segment_id
    )
)
WHERE a['state'] IS NOT NULL;

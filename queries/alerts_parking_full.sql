-- A lot or street is full: its occupancy over each minute at 95 % or more for 5 minutes
-- raises, 85 % or less clears, then 15 minutes' cooldown; an alert on a lot that stops
-- reporting expires after 30 minutes. The message names the free spaces left.
-- Published to city.alerts (kind parking_full), keyed by entity_id.
INSERT INTO alerts
SELECT concat('parking_full:', lot_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'parking_full' AS kind,
       'parking_lot' AS entity_type,
       lot_id AS entity_id,
       ward_id,
       'occupancy_pct' AS metric,
       occupancy AS value,
       CAST(95.0 AS DOUBLE) AS baseline,
       occupancy AS score,
       'occupancy' AS detector,
       'occupancy >= 95 % for 5 min raises, <= 85 % clears; cooldown 15 min; expires after 30 min without data' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat(coalesce(name, lot_id), ' full: ', round(occupancy, 1), ' % occupied, ',
              CAST(round(free, 0) AS BIGINT), ' of ', capacity, ' spaces free') AS message
FROM (
    SELECT *,
           alert_state(occupancy, window_end, 95, 85, INTERVAL '5 minutes',
                       INTERVAL '15 minutes', INTERVAL '30 minutes')
               OVER (PARTITION BY lot_id ORDER BY window_end) AS a
    FROM (
        SELECT p.lot_id, max(l.name) AS name, coalesce(max(l.ward_id), 'unknown') AS ward_id,
               window_start, window_end,
               100.0 * sum(least(p.occupied, p.spaces)) / sum(p.spaces) AS occupancy,
               coalesce(max(l.capacity), max(p.spaces)) AS capacity,
               coalesce(max(l.capacity), max(p.spaces))
                   * (1.0 - CAST(sum(least(p.occupied, p.spaces)) AS DOUBLE) / sum(p.spaces)) AS free
        FROM parking_readings p
        LEFT JOIN parking_lots l ON p.lot_id = l.lot_id
        WHERE p.spaces > 0 AND p.occupied >= 0
        GROUP BY tumble(p.event_time, INTERVAL '1 minute'), p.lot_id
    )
)
WHERE a['state'] IS NOT NULL;

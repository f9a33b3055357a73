-- Parking availability per ward every 5 minutes: the ward's lots and streets that reported,
-- their capacity, their free spaces summed (each lot's as in parking_lot_availability) and the
-- occupied share of the ward's capacity. A window of the lots' 5-minute windows, so a lot that
-- reports more often does not weigh more.
-- Published to city.indicators.parking (entity_type ward), keyed by entity_id.
INSERT INTO parking_availability
SELECT 'ward' AS entity_type,
       ward_id AS entity_id,
       ward_id,
       window_start,
       window_end,
       count(*) AS lots,
       CAST(sum(capacity) AS BIGINT) AS capacity,
       round(100.0 * (1.0 - sum(free) / sum(capacity)), 1) AS occupancy_pct,
       round(sum(free), 1) AS free_spaces,
       round(max(peak), 1) AS peak_occupancy_pct,
       sum(readings) AS readings
FROM (
    SELECT p.lot_id,
           coalesce(max(l.ward_id), 'unknown') AS ward_id,
           window_start AS five,
           coalesce(max(l.capacity), max(p.spaces)) AS capacity,
           coalesce(max(l.capacity), max(p.spaces))
               * (1.0 - CAST(sum(least(p.occupied, p.spaces)) AS DOUBLE) / sum(p.spaces)) AS free,
           max(100.0 * least(p.occupied, p.spaces) / p.spaces) AS peak,
           count(*) AS readings
    FROM parking_readings p
    LEFT JOIN parking_lots l ON p.lot_id = l.lot_id
    WHERE p.spaces > 0 AND p.occupied >= 0
    GROUP BY tumble(p.event_time, INTERVAL '5 minutes'), p.lot_id
)
GROUP BY tumble(five, INTERVAL '5 minutes'), ward_id;

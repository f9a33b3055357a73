-- Parking availability per lot or street every 5 minutes: the occupied share of the spaces
-- its sensors covered (a barrier counter covers the lot; bay sensors the bays reporting),
-- the free spaces that share leaves of the lot's capacity (schemas/reference/parking_lots.csv)
-- and the fullest single reading. A count above the spaces it covers (a barrier counter that
-- drifted) counts as full; a reading of no spaces or a negative count is left out. A lot
-- missing from parking_lots.csv is still counted, under ward 'unknown' with the spaces it
-- reports as its capacity.
-- Published to city.indicators.parking (entity_type lot), keyed by entity_id.
INSERT INTO parking_availability
SELECT 'lot' AS entity_type,
       p.lot_id AS entity_id,
       coalesce(max(l.ward_id), 'unknown') AS ward_id,
       window_start,
       window_end,
       CAST(1 AS BIGINT) AS lots,
       CAST(coalesce(max(l.capacity), max(p.spaces)) AS BIGINT) AS capacity,
       round(100.0 * sum(least(p.occupied, p.spaces)) / sum(p.spaces), 1) AS occupancy_pct,
       round(coalesce(max(l.capacity), max(p.spaces))
             * (1.0 - CAST(sum(least(p.occupied, p.spaces)) AS DOUBLE) / sum(p.spaces)), 1) AS free_spaces,
       round(max(100.0 * least(p.occupied, p.spaces) / p.spaces), 1) AS peak_occupancy_pct,
       count(*) AS readings
FROM parking_readings p
LEFT JOIN parking_lots l ON p.lot_id = l.lot_id
WHERE p.spaces > 0 AND p.occupied >= 0
GROUP BY tumble(p.event_time, INTERVAL '5 minutes'), p.lot_id;

-- Sensor faults of the air-quality sensors, each its own alert kind: stuck (flat-lined),
-- out of physical range, impossible jumps, and missing, decided on event time (a sensor that
-- falls silent is reported once the watermark passes its last reading + 3 × its reporting
-- interval, even if it never reports again). Every sensor of schemas/reference/sensors.csv
-- reports each minute; for a fleet with several intervals, write one missing statement per
-- interval, joined with sensors and filtered on interval_s.
-- Published to city.alerts, keyed by entity_id (the sensor), with the sensor's ward.

INSERT INTO alerts
SELECT concat('sensor_stuck:', sensor_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'sensor_stuck' AS kind,
       'sensor' AS entity_type,
       sensor_id AS entity_id,
       'pm25' AS metric,
       f['value'] AS value,
       CAST(NULL AS DOUBLE) AS baseline,
       f['detail'] AS score,
       'sensor_stuck' AS detector,
       '10 identical PM2.5 readings in a row raise; a different reading clears' AS rule,
       CAST(NULL AS TIMESTAMP) AS window_start,
       event_time AS window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat('PM2.5 stuck at ', f['value'], ' µg/m³ for ', f['detail'], ' readings') AS message,
       ward_id
FROM (
    SELECT *,
           alert_state(CASE WHEN f['fault'] THEN 1.0 ELSE 0.0 END, event_time, 1, 0)
               OVER (PARTITION BY sensor_id ORDER BY event_time) AS a
    FROM (
        SELECT sensor_id, ward_id, event_time,
               sensor_stuck(pm25, event_time, 10) OVER (PARTITION BY sensor_id ORDER BY event_time) AS f
        FROM air_readings
    )
)
WHERE a['state'] IS NOT NULL;

INSERT INTO alerts
SELECT concat('sensor_out_of_range:', sensor_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'sensor_out_of_range' AS kind,
       'sensor' AS entity_type,
       sensor_id AS entity_id,
       'pm25' AS metric,
       f['value'] AS value,
       CAST(NULL AS DOUBLE) AS baseline,
       f['detail'] AS score,
       'sensor_out_of_range' AS detector,
       'a PM2.5 reading outside 0–1000 µg/m³ raises; a valid reading clears' AS rule,
       CAST(NULL AS TIMESTAMP) AS window_start,
       event_time AS window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat('PM2.5 reading ', f['value'], ' µg/m³ is outside the physical range (limit ', f['detail'], ')') AS message,
       ward_id
FROM (
    SELECT *,
           alert_state(CASE WHEN f['fault'] THEN 1.0 ELSE 0.0 END, event_time, 1, 0)
               OVER (PARTITION BY sensor_id ORDER BY event_time) AS a
    FROM (
        SELECT sensor_id, ward_id, event_time,
               sensor_out_of_range(pm25, event_time, 'pm25') OVER (PARTITION BY sensor_id ORDER BY event_time) AS f
        FROM air_readings
    )
)
WHERE a['state'] IS NOT NULL;

INSERT INTO alerts
SELECT concat('sensor_jump:', sensor_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'sensor_jump' AS kind,
       'sensor' AS entity_type,
       sensor_id AS entity_id,
       'pm25' AS metric,
       f['value'] AS value,
       CAST(NULL AS DOUBLE) AS baseline,
       f['detail'] AS score,
       'sensor_jump' AS detector,
       'a PM2.5 change faster than 300 µg/m³ per minute raises; a plausible change clears' AS rule,
       CAST(NULL AS TIMESTAMP) AS window_start,
       event_time AS window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat('PM2.5 jumped by ', round(f['detail'], 1), ' µg/m³ to ', f['value']) AS message,
       ward_id
FROM (
    SELECT *,
           alert_state(CASE WHEN f['fault'] THEN 1.0 ELSE 0.0 END, event_time, 1, 0)
               OVER (PARTITION BY sensor_id ORDER BY event_time) AS a
    FROM (
        SELECT sensor_id, ward_id, event_time,
               sensor_jump(pm25, event_time, 'pm25') OVER (PARTITION BY sensor_id ORDER BY event_time) AS f
        FROM air_readings
    )
)
WHERE a['state'] IS NOT NULL;

INSERT INTO alerts
SELECT concat('sensor_missing:', sensor_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'sensor_missing' AS kind,
       'sensor' AS entity_type,
       sensor_id AS entity_id,
       'pm25' AS metric,
       f['value'] AS value,
       CAST(NULL AS DOUBLE) AS baseline,
       f['detail'] AS score,
       'sensor_missing' AS detector,
       'no reading for 3 minutes (3 × the interval, on event time) raises; the next reading clears' AS rule,
       CAST(NULL AS TIMESTAMP) AS window_start,
       event_time AS window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat('No reading for ', round(f['detail']), ' s') AS message,
       ward_id
FROM (
    SELECT *,
           alert_state(CASE WHEN f['fault'] THEN 1.0 ELSE 0.0 END, event_time, 1, 0)
               OVER (PARTITION BY sensor_id ORDER BY event_time) AS a
    FROM (
        SELECT sensor_id, ward_id, event_time,
               sensor_missing(pm25, event_time, INTERVAL '1 minute', 3) OVER (PARTITION BY sensor_id ORDER BY event_time) AS f
        FROM air_readings
    )
)
WHERE a['state'] IS NOT NULL;

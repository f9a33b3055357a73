-- Flood warnings per gauge: each minute's highest level is placed on the site's warning steps
-- (schemas/reference/gauges.csv): 1 at level I, 2 at level II, 3 at level III, linear between
-- them (and below I by the I–II step), so one rule fits a street gauge (cm of water on the
-- road) and the river (cm of stage, levels metres apart). Raised when the level has stayed at
-- level I for 2 minutes; UPDATED whenever its severity changes (2 from level I, 3 from half
-- way to II, 4 from level II, 5 from level III, and back down); cleared when it falls a fifth
-- of a step below level I; no cooldown (the hysteresis and the 2 minutes keep it from
-- flapping, and a warning must not wait); expires after 30 minutes without data. Levels not
-- in increasing order give no score.
-- Published to city.alerts (kind flood_warning), keyed by entity_id.
INSERT INTO alerts
SELECT concat('flood_warning:', gauge_id, ':', to_char(a['started_at'], '%Y%m%dT%H%M%S')) AS alert_id,
       a['state'] AS state,
       'flood_warning' AS kind,
       'gauge' AS entity_type,
       gauge_id AS entity_id,
       ward_id,
       'level_cm' AS metric,
       level AS value,
       CAST(l1 AS DOUBLE) AS baseline,
       round(step, 2) AS score,
       'warning_levels' AS detector,
       'level I for 2 min raises (severity follows the level), a fifth of a step below I clears; expires after 30 min without data' AS rule,
       window_start,
       window_end,
       a['started_at'] AS started_at,
       a['severity'] AS severity,
       concat(name, ': water ', round(level, 1), ' cm, ',
              CASE WHEN level >= l3 THEN 'level III' WHEN level >= l2 THEN 'level II'
                   WHEN level >= l1 THEN 'level I' ELSE 'below level I' END,
              ' (I ', CAST(l1 AS BIGINT), ', II ', CAST(l2 AS BIGINT), ', III ',
              CAST(l3 AS BIGINT), ' cm)') AS message
FROM (
    SELECT *,
           alert_state(step, window_end, 1, 0.8, INTERVAL '2 minutes', INTERVAL '0 minutes',
                       INTERVAL '30 minutes')
               OVER (PARTITION BY gauge_id ORDER BY window_end) AS a
    FROM (
        SELECT *,
               CASE WHEN NOT (l1 < l2 AND l2 < l3) THEN NULL
                    WHEN level < l2 THEN 1.0 + (level - l1) / (l2 - l1)
                    WHEN level < l3 THEN 2.0 + (level - l2) / (l3 - l2)
                    ELSE 3.0 + (level - l3) / (l3 - l2) END AS step
        FROM (
            SELECT w.gauge_id, max(g.name) AS name, max(g.ward_id) AS ward_id,
                   window_start, window_end, max(w.level_cm) AS level,
                   CAST(max(g.level_1_cm) AS DOUBLE) AS l1,
                   CAST(max(g.level_2_cm) AS DOUBLE) AS l2,
                   CAST(max(g.level_3_cm) AS DOUBLE) AS l3
            FROM water_levels w
            JOIN gauges g ON w.gauge_id = g.gauge_id
            WHERE w.level_cm IS NOT NULL
            GROUP BY tumble(w.event_time, INTERVAL '1 minute'), w.gauge_id
        )
    )
)
WHERE a['state'] IS NOT NULL;

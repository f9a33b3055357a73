-- Water level per gauge every 5 minutes: the latest and highest level, the rate of rise over
-- the window (latest minus first reading, per hour; negative when the water falls), the mean
-- rainfall where a rain gauge is fitted, and the warning level the highest level reached
-- against the site's levels I, II and III (schemas/reference/gauges.csv). Readings without a
-- level (a failed reading) are not counted. A gauge missing from gauges.csv has no warning
-- levels and gets no indicator.
-- Published to city.indicators.water, keyed by gauge_id.
INSERT INTO water_indicators
SELECT gauge_id, ward_id, segment_id, window_start, window_end,
       level_cm, max_level_cm,
       round((level_cm - first_cm) * 3600.0 / nullif(span_s, 0), 1) AS rise_cm_h,
       rainfall_mm_h,
       CAST(CASE WHEN max_level_cm >= l3 THEN 3
                 WHEN max_level_cm >= l2 THEN 2
                 WHEN max_level_cm >= l1 THEN 1
                 ELSE 0 END AS INT) AS warning_level,
       readings
FROM (
    SELECT w.gauge_id, max(g.ward_id) AS ward_id, max(g.segment_id) AS segment_id,
           window_start, window_end,
           last_value(w.level_cm ORDER BY w.event_time) AS level_cm,
           first_value(w.level_cm ORDER BY w.event_time) AS first_cm,
           max(w.level_cm) AS max_level_cm,
           date_part('epoch', max(w.event_time)) - date_part('epoch', min(w.event_time)) AS span_s,
           round(avg(w.rainfall_mm_h), 1) AS rainfall_mm_h,
           max(g.level_1_cm) AS l1, max(g.level_2_cm) AS l2, max(g.level_3_cm) AS l3,
           count(*) AS readings
    FROM water_levels w
    JOIN gauges g ON w.gauge_id = g.gauge_id
    WHERE w.level_cm IS NOT NULL
    GROUP BY tumble(w.event_time, INTERVAL '5 minutes'), w.gauge_id
);

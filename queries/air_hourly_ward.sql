-- Hourly VN_AQI per ward, from every reading of the ward's sensors: as air_hourly_sensor.sql,
-- with the ward's hourly means taken over all its sensors' readings. An hour counts only with
-- 75 % of the readings the ward's sensors should send together (ward_sensors, derived from
-- schemas/reference/sensors.csv). Published to city.indicators.air (scope 'ward', period
-- 'hour'), keyed by ward id.
INSERT INTO air_indicators
SELECT entity_id, scope, window_start, window_end, period, pm25, pm10, pm25_nowcast,
       pm10_nowcast, o3_1h, no2, so2, co, readings, aqi,
       vn_aqi_category(aqi) AS category,
       vn_aqi_category(aqi, 'en') AS category_en,
       vn_aqi_category(aqi, 'rgb') AS colour,
       vn_aqi_dominant(pm25_nowcast, pm10_nowcast, o3_1h, no2, so2, co) AS dominant_pollutant,
       complete
FROM (
  SELECT *, vn_aqi(pm25_nowcast, pm10_nowcast, o3_1h, no2, so2, co) AS aqi
  FROM (
    SELECT entity_id, 'ward' AS scope, window_end - INTERVAL '1 hour' AS window_start,
           window_end, 'hour' AS period,
           hour_mean(pm25, window_end) AS pm25,
           hour_mean(pm10, window_end) AS pm10,
           nowcast(pm25, window_end) AS pm25_nowcast,
           nowcast(pm10, window_end) AS pm10_nowcast,
           hour_mean(o3, window_end) AS o3_1h,
           hour_mean(no2, window_end) AS no2,
           hour_mean(so2, window_end) AS so2,
           hour_mean(co, window_end) AS co,
           coalesce(hour_at(pm25, window_end)['readings'], 0) AS readings,
           coalesce(hour_at(pm25, window_end)['complete'], false) AS complete
    FROM (
    SELECT a.ward_id AS entity_id,
           window_start,
           window_end,
           hourly_means(CASE WHEN reading_valid('pm25', a.pm25) THEN a.pm25 END,
                        a.event_time, coalesce(w.expected_per_hour, 60)) AS pm25,
           hourly_means(CASE WHEN reading_valid('pm10', a.pm10) THEN a.pm10 END,
                        a.event_time, coalesce(w.expected_per_hour, 60)) AS pm10,
           hourly_means(CASE WHEN reading_valid('o3', a.o3) THEN a.o3 END,
                        a.event_time, coalesce(w.expected_per_hour, 60)) AS o3,
           hourly_means(CASE WHEN reading_valid('no2', a.no2) THEN a.no2 END,
                        a.event_time, coalesce(w.expected_per_hour, 60)) AS no2,
           hourly_means(CASE WHEN reading_valid('so2', a.so2) THEN a.so2 END,
                        a.event_time, coalesce(w.expected_per_hour, 60)) AS so2,
           hourly_means(CASE WHEN reading_valid('co', a.co) THEN a.co END,
                        a.event_time, coalesce(w.expected_per_hour, 60)) AS co
    FROM air_readings a LEFT JOIN ward_sensors w ON a.ward_id = w.ward_id
    GROUP BY hop(a.event_time, INTERVAL '1 hour', INTERVAL '12 hours'), a.ward_id
    )
  )
);

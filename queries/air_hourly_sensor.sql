-- Hourly VN_AQI per air sensor (Decision 1459/QĐ-TCMT): PM2.5 and PM10 by NowCast over the
-- 12 latest hourly means, O3, NO2, SO2 and CO by their 1-hour means. Published to
-- city.indicators.air (scope 'sensor', period 'hour'), keyed by sensor id, when event time
-- passes the end of each hour.
-- A 12-hour window sliding by 1 hour holds the hours NowCast needs; a row describes the
-- window's last hour [window_end - 1 h, window_end). An hour counts only with 75 % of the
-- readings the sensor should send (interval_s in schemas/reference/sensors.csv, 60 s when the
-- sensor is unknown); readings outside their physical range are left out.
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
    SELECT entity_id, 'sensor' AS scope, window_end - INTERVAL '1 hour' AS window_start,
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
    SELECT a.sensor_id AS entity_id,
           window_start,
           window_end,
           hourly_means(CASE WHEN reading_valid('pm25', a.pm25) THEN a.pm25 END,
                        a.event_time, 3600.0 / coalesce(s.interval_s, 60)) AS pm25,
           hourly_means(CASE WHEN reading_valid('pm10', a.pm10) THEN a.pm10 END,
                        a.event_time, 3600.0 / coalesce(s.interval_s, 60)) AS pm10,
           hourly_means(CASE WHEN reading_valid('o3', a.o3) THEN a.o3 END,
                        a.event_time, 3600.0 / coalesce(s.interval_s, 60)) AS o3,
           hourly_means(CASE WHEN reading_valid('no2', a.no2) THEN a.no2 END,
                        a.event_time, 3600.0 / coalesce(s.interval_s, 60)) AS no2,
           hourly_means(CASE WHEN reading_valid('so2', a.so2) THEN a.so2 END,
                        a.event_time, 3600.0 / coalesce(s.interval_s, 60)) AS so2,
           hourly_means(CASE WHEN reading_valid('co', a.co) THEN a.co END,
                        a.event_time, 3600.0 / coalesce(s.interval_s, 60)) AS co
    FROM air_readings a LEFT JOIN sensors s ON a.sensor_id = s.sensor_id
    GROUP BY hop(a.event_time, INTERVAL '1 hour', INTERVAL '12 hours'), a.sensor_id
    )
  )
);

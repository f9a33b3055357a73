-- Daily VN_AQI per air sensor (Decision 1459/QĐ-TCMT) over the local calendar day
-- (Asia/Ho_Chi_Minh, UTC+7: days start at 17:00 UTC). PM2.5 and PM10: the mean of the day's
-- complete hourly means; O3: the larger of the day's maximum 1-hour mean and maximum 8-hour
-- mean (the 8-hour one is skipped above 400 µg/m³); NO2, SO2, CO: the day's maximum 1-hour
-- mean. A day is complete with at least 18 complete PM2.5 hours. Published to
-- city.indicators.air (scope 'sensor', period 'day'), keyed by sensor id, when event time
-- passes the end of the day.
INSERT INTO air_indicators
SELECT entity_id, scope, window_start, window_end, period, pm25, pm10, o3_1h, o3_8h, no2, so2,
       co, readings, aqi,
       vn_aqi_category(aqi) AS category,
       vn_aqi_category(aqi, 'en') AS category_en,
       vn_aqi_category(aqi, 'rgb') AS colour,
       dominant_pollutant,
       complete
FROM (
  SELECT *,
         vn_aqi_daily(pm25, pm10, o3_1h, o3_8h, no2, so2, co) AS aqi,
         vn_aqi_dominant(pm25, pm10, o3_1h, o3_8h, no2, so2, co) AS dominant_pollutant
  FROM (
    SELECT entity_id, 'sensor' AS scope, window_start, window_end, 'day' AS period,
           hours_mean(pm25) AS pm25,
           hours_mean(pm10) AS pm10,
           hours_max(o3) AS o3_1h,
           hours_max_mean(o3, 8) AS o3_8h,
           hours_max(no2) AS no2,
           hours_max(so2) AS so2,
           hours_max(co) AS co,
           coalesce(hours_complete(pm25), 0) AS readings,
           coalesce(hours_complete(pm25), 0) >= 18 AS complete
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
    GROUP BY tumble(a.event_time, INTERVAL '1 day', INTERVAL '17 hours'), a.sensor_id
    )
  )
);

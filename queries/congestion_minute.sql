-- Congestion indicators per road segment and minute, from camera detections, with the
-- segment's reference data (lanes, free-flow speed, capacity, class) joined in.
-- Published to city.indicators.congestion, keyed by segment_id, when event time passes the
-- end of each minute (watermark: largest event time seen minus 5 s).
-- Level of service: HCM urban-street rule (speed share of free flow, v/c > 1 forces F) for
-- urban streets, density rule for expressways. Detections on a segment missing from
-- schemas/reference/segments.csv still count; their reference-based indicators are null.
INSERT INTO congestion_indicators
SELECT segment_id, window_start, window_end, vehicles, mean_speed_kmh, motorbike_share,
       space_mean_speed_kmh, flow_veh_h, flow_pcu_h,
       density(flow_pcu_h, space_mean_speed_kmh, lanes) AS density_pcu_km_ln,
       v_c(flow_pcu_h, capacity_pcu_h) AS v_c,
       tti(free_flow_kmh, space_mean_speed_kmh) AS tti,
       CASE WHEN road_class = 'expressway'
            THEN los_freeway(density(flow_pcu_h, space_mean_speed_kmh, lanes),
                             v_c(flow_pcu_h, capacity_pcu_h))
            ELSE los_urban(space_mean_speed_kmh, free_flow_kmh, v_c(flow_pcu_h, capacity_pcu_h))
       END AS los
FROM (
    SELECT c.segment_id,
           window_start,
           window_end,
           count(*) AS vehicles,
           avg(c.speed_kmh) AS mean_speed_kmh,
           avg(CASE WHEN c.vehicle_class = 'motorbike' THEN 1.0 ELSE 0.0 END) AS motorbike_share,
           space_mean_speed(c.speed_kmh) AS space_mean_speed_kmh,
           flow_rate(count(*), window_start, window_end) AS flow_veh_h,
           flow_rate(sum(pcu(c.vehicle_class)), window_start, window_end) AS flow_pcu_h,
           max(s.lanes) AS lanes,
           max(s.free_flow_kmh) AS free_flow_kmh,
           max(s.capacity_pcu_h) AS capacity_pcu_h,
           max(s.road_class) AS road_class
    FROM camera_events c LEFT JOIN segments s ON c.segment_id = s.segment_id
    WHERE c.kind = 'detection'
    GROUP BY tumble(c.event_time, INTERVAL '1 minute'), c.segment_id
);

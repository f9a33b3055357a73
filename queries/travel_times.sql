-- Camera-to-camera travel times per road segment, every five minutes: a vehicle read by one
-- camera and, within ten minutes, by another camera of the segment facing the same way
-- (matched by anonymised plate hash) has travelled between them. A join of the camera stream
-- with itself, bounded in event time; windows over the time of the second reading.
-- Published to city.indicators.travel, keyed by segment_id.
INSERT INTO travel_times
SELECT a.segment_id, window_start, window_end, count(*) AS vehicles,
       avg(date_part('epoch', b.event_time) - date_part('epoch', a.event_time)) AS mean_travel_s,
       min(date_part('epoch', b.event_time) - date_part('epoch', a.event_time)) AS min_travel_s,
       max(date_part('epoch', b.event_time) - date_part('epoch', a.event_time)) AS max_travel_s
FROM camera_events a
JOIN camera_events b
  ON a.plate_hash = b.plate_hash
 AND a.segment_id = b.segment_id
 AND a.camera_id <> b.camera_id
 AND a.direction = b.direction
 AND b.event_time > a.event_time
 AND b.event_time <= a.event_time + INTERVAL '10 minutes'
WHERE a.kind = 'detection' AND b.kind = 'detection'
GROUP BY tumble(b.event_time, INTERVAL '5 minutes'), a.segment_id;

//! Checkpoints and recovery: restoring a checkpoint (all partitions' state, or one
//! partition's), the exactly-once replay that holds back what was published after it, and
//! taking checkpoints.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info};

use super::{CheckpointInfo, Pipeline, blocking, epoch_ms};
use crate::checkpoint::{CheckpointStore, Manifest, Position, QueryManifest};
use crate::error::{Error, Result};
use crate::plan::stream::StreamQuery;
use crate::source::{Positions, partitions_of};

/// A pipeline's checkpointing state.
pub(super) struct Checkpoints {
    /// Where the pipeline's checkpoints go, and how many are kept.
    pub(super) location: crate::checkpoint::Location,
    pub(super) retain: usize,
    /// Where checkpoints go, with the number of the last one written or restored: one store
    /// in the directory itself when one state holds all partitions; one per input partition
    /// (sub-directory `<topic>.<partition>`) otherwise.
    pub(super) stores: HashMap<Option<(String, i32)>, (CheckpointStore, u64)>,
    pub(super) interval: Duration,
    pub(super) last: std::time::Instant,
    /// While replaying after recovery in exactly-once mode.
    pub(super) replay: Option<Replay>,
    /// When the replay reached the input's ends at recovery.
    pub(super) caught_up: Option<std::time::Instant>,
    /// The checkpoint being written in the background, if any.
    pub(super) writing: Option<Writing>,
    /// What the last checkpoint of every state held was taken at: its queries' change counts
    /// and the input positions. A periodic checkpoint at the same is not written again (an
    /// idle service would write unchanged state every interval).
    pub(super) written: Option<TakenAt>,
}

/// The change counts of a pipeline's query instances and its input positions, sorted.
pub(super) type TakenAt = (Vec<u64>, Vec<((String, i32), i64)>);

/// A checkpoint being written on a blocking thread while the pipeline goes on: its state is
/// taken (and, in exactly-once mode, its transaction committed) before the write starts, so
/// a crash before the write ends recovers from the previous checkpoint, like a crash between
/// the commit and the write (the outputs published since are read back and not published
/// again).
pub(super) struct Writing {
    task: tokio::task::JoinHandle<Result<u64>>,
    started: std::time::Instant,
    at_ms: i64,
    epoch: u64,
}

impl Checkpoints {
    /// The store of `key` (a partition's; the one store when `None`), opened on first use.
    pub(super) fn store(&mut self, key: &Option<(String, i32)>) -> Result<CheckpointStore> {
        if let Some((store, _)) = self.stores.get(key) {
            return Ok(store.clone());
        }
        let location = match key {
            Some((topic, partition)) => self.location.join(&format!("{topic}.{partition}")),
            None => self.location.clone(),
        };
        let store = CheckpointStore::at(location, self.retain)?;
        self.stores.insert(key.clone(), (store.clone(), 0));
        Ok(store)
    }
}

/// The input positions of a checkpoint.
pub(super) fn positions_of(manifest: &Manifest) -> Positions {
    manifest
        .positions
        .iter()
        .map(|p| ((p.topic.clone(), p.partition), p.offset))
        .collect()
}

/// A replay after recovery in exactly-once mode.
pub(super) struct Replay {
    /// The input ends at recovery: once every partition is read up to them, nothing
    /// published before the crash can be produced again, and suppression ends.
    pub(super) until: Positions,
    /// Where the read-back of published outputs started. Checkpoints taken during the replay
    /// keep these as their output marks: records published after them and not yet replayed
    /// are still to be held back if this process dies too.
    pub(super) marks: Vec<Position>,
}

/// How long, after the replay following a recovery has caught up with the input, outputs
/// read back are still held back while some have not come again (they may be due on
/// processing time: an idle partition's windows, an early fire).
pub(super) const REPLAY_GRACE: Duration = Duration::from_secs(120);

impl Pipeline {
    /// One state for all partitions: restores the newest checkpoint, if any, and places the
    /// source at its positions (at the group's positions otherwise); in exactly-once mode,
    /// reads back what the query published since the checkpoint so that the replay does not
    /// publish it again. Then writes a first checkpoint, so that a crash before the next one
    /// recovers from here.
    pub(super) async fn recover(&mut self) -> Result<()> {
        let now = epoch_ms();
        let found = self.restore(None, now).await?;
        let (positions, marks) = match found {
            Some(manifest) => (positions_of(&manifest), Some(manifest.outputs)),
            None => {
                // Blocking calls at start: the topics' partitions and the group's committed
                // offsets.
                let all = blocking(|| self.source.topic_partitions(Duration::from_secs(30)))?;
                blocking(|| self.refuse_state_elsewhere(&all))?;
                let positions = blocking(|| {
                    self.source
                        .starting_positions(&all, Duration::from_secs(30))
                })?;
                (positions, None)
            }
        };
        self.source.set_positions(positions.clone());
        if self.sink.is_transactional() {
            let inputs: Vec<(String, i32)> = positions.keys().cloned().collect();
            self.replay_from(marks, &inputs).await?;
        }
        self.checkpoint().await
    }

    /// With queries that keep state and no checkpoint for `partitions`: fails when the
    /// consumer group has read some of them before. Their state is then in a checkpoint this
    /// process cannot see (another process's local directory); starting from empty state
    /// would publish wrong results.
    pub(super) fn refuse_state_elsewhere(&self, partitions: &[(String, i32)]) -> Result<()> {
        // A query created again under a dropped one's name starts afresh: the group's
        // offsets are the dropped query's.
        if self.checkpoints.is_none()
            || self.config.from_beginning
            || !self.queries.iter().any(|r| r.query.holds_state())
        {
            return Ok(());
        }
        let read = self
            .source
            .read_before(partitions, Duration::from_secs(30))?;
        if read.is_empty() {
            return Ok(());
        }
        let dir = self.checkpoint_location();
        let shown: Vec<String> = read
            .iter()
            .map(|((t, p), o)| format!("{t}[{p}] at offset {o}"))
            .collect();
        let afresh = match (&self.config.name, self.config.builtin) {
            (Some(name), true) => self.builtin_afresh(name),
            (Some(name), false) => {
                format!("reset the query to start it afresh (`urbanstream query reset {name}`)")
            }
            _ => "drop and re-create the query to start it afresh".into(),
        };
        // Kept whole by an earlier run, now split per partition: an earlier version kept a
        // query of this kind (detectors over windows grouped by another key) in one state.
        let whole = self.checkpoints.as_ref().is_some_and(|c| {
            !c.stores.contains_key(&None)
                && CheckpointStore::at(c.location.clone(), c.retain)
                    .and_then(|store| store.epochs())
                    .is_ok_and(|epochs| !epochs.is_empty())
        });
        if whole {
            return Err(Error::Checkpoint(format!(
                "consumer group {} has read {} before, and {dir} holds the query's state as \
                 one state for all partitions, but the query now keeps one state per \
                 partition (this version repartitions queries an earlier one kept whole, such \
                 as detectors over windows keyed by their groups): one state cannot be split \
                 into them, so the query stops rather than start from empty state. To go on, \
                 {afresh}",
                self.config.group_id,
                shown.join(", "),
            )));
        }
        Err(Error::Checkpoint(format!(
            "consumer group {} has read {} before, but {dir} holds no checkpoint of {}: the \
             query's state for them was kept by a process whose checkpoints this one cannot \
             read. Starting from empty state would publish wrong windows, so the query stops. \
             Give every process of the deployment the same checkpoint storage (checkpoint.url \
             naming one object store, or checkpoint.dir on a volume they share), or {}",
            self.config.group_id,
            shown.join(", "),
            if read.len() == 1 { "it" } else { "them" },
            afresh,
        )))
    }

    /// Where its checkpoints go, as messages name it.
    fn checkpoint_location(&self) -> String {
        self.config
            .checkpoint
            .as_ref()
            .map(|c| c.location.to_string())
            .unwrap_or_default()
    }

    /// What to do with a built-in query whose state cannot be used: it is neither dropped
    /// nor upgraded.
    fn builtin_afresh(&self, name: &str) -> String {
        let root = self.checkpoint_location();
        format!(
            "Built-in queries are neither dropped nor upgraded: start it afresh with \
             `urbanstream query reset {name}` (its state at {root} removed, its inputs read \
             from their beginning), or pause it (`urbanstream query pause {name}`) and \
             register your own copy of its SQL under another name"
        )
    }

    /// Reads the newest checkpoint of `key`'s store (the one store when `None`) and restores
    /// it into the queries' instances for it; returns its manifest, if there was one.
    pub(super) async fn restore(
        &mut self,
        key: Option<(String, i32)>,
        now: i64,
    ) -> Result<Option<Manifest>> {
        let Some(checkpoints) = &mut self.checkpoints else {
            return Ok(None);
        };
        let store = checkpoints.store(&key)?;
        let found = tokio::task::spawn_blocking(move || store.latest())
            .await
            .map_err(|e| Error::Checkpoint(format!("reading task failed: {e}")))??;
        let Some(checkpoint) = found else {
            return Ok(None);
        };
        let manifest = &checkpoint.manifest;
        // A partition's store holds that partition's state: one holding only another
        // partition's of the same topic was moved (two stores swapped restored each other's
        // state, and windows were published in two partial rows).
        if let Some((topic, partition)) = &key {
            let of_topic: Vec<i32> = manifest
                .positions
                .iter()
                .filter(|p| &p.topic == topic)
                .map(|p| p.partition)
                .collect();
            if !of_topic.is_empty() && !of_topic.contains(partition) {
                return Err(Error::Checkpoint(format!(
                    "{} holds the state of partition {of_topic:?} of {topic}, not of partition \
                     {partition}: a checkpoint directory was moved; move it back, or away to \
                     start that partition from scratch",
                    checkpoint.location
                )));
            }
        }
        let names: Vec<&str> = manifest.queries.iter().map(|q| q.name.as_str()).collect();
        let ours: Vec<&super::Running> = self
            .queries
            .iter()
            .filter(|r| key.as_ref().is_none_or(|(t, _)| r.topic() == t))
            .collect();
        if names != ours.iter().map(|r| r.name.as_str()).collect::<Vec<_>>() {
            return Err(Error::Checkpoint(format!(
                "{} was taken for other queries ({}) than these ({}); move the directory \
                 away to start from scratch",
                checkpoint.location,
                names.join(", "),
                ours.iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        // State taken under other SQL is restored when it means the same to this SQL (an
        // upgrade); otherwise the query stops rather than misread it.
        for (taken, running) in manifest.queries.iter().zip(&ours) {
            let query = &running.query;
            // (Checkpoints written before layouts were recorded did not record settings
            // either: their SQL alone is compared, as it was then.)
            let tables = query.tables_identity();
            if taken.sql == query.sql()
                && (taken.tables.is_empty() || taken.tables == tables)
                && (taken.layout.is_empty() || taken.settings == query.settings_sql())
            {
                continue;
            }
            if let Some(why) = crate::checkpoint::misfit(
                taken,
                query.sql(),
                &query.settings_sql(),
                &tables,
                &query.state_layout(),
            ) {
                if self.config.builtin {
                    return Err(Error::Checkpoint(format!(
                        "{}: built-in query {} was checkpointed under the SQL of another \
                         version of urbanstream, and its state does not fit the SQL this \
                         version ships: {why}. {}",
                        checkpoint.location,
                        running.name,
                        self.builtin_afresh(&running.name)
                    )));
                }
                return Err(Error::Checkpoint(format!(
                    "{}: query {} was checkpointed under other SQL, and its state does not fit \
                     this SQL: {why}. Go back to the SQL the state was taken for (`urbanstream \
                     query upgrade {} --file OLD.sql`), or start it afresh (`urbanstream query \
                     reset {}`)",
                    checkpoint.location, running.name, running.name, running.name
                )));
            }
            info!(
                query = %running.name,
                location = %checkpoint.location,
                "state taken under other SQL with the same layout restored (an upgrade)"
            );
        }
        let mut states = checkpoint.queries.iter();
        for running in &mut self.queries {
            let name = running.name.clone();
            let Some((instance, upstream)) = running.instance_for(&key) else {
                continue;
            };
            let Some(state) = states.next() else {
                break;
            };
            if let (Some(upstream), Some(seen)) = (upstream, state.meta.get("upstream")) {
                let seen: Vec<(i32, i64)> = serde_json::from_value(seen.clone())
                    .map_err(|e| Error::Checkpoint(format!("upstream offsets: {e}")))?;
                *upstream = seen.into_iter().collect();
            }
            instance.restore(state, now).map_err(|e| {
                Error::Checkpoint(format!("{}: query {name}: {e}", checkpoint.location))
            })?;
        }
        if let Some(c) = &mut self.checkpoints
            && let Some(entry) = c.stores.get_mut(&key)
        {
            entry.1 = entry.1.max(manifest.epoch);
        }
        if let Ok(mut last) = self.stats.last_checkpoint.lock() {
            *last = Some(CheckpointInfo {
                epoch: manifest.epoch,
                at_ms: manifest.created_at_ms,
                bytes: manifest.files.iter().map(|f| f.1).sum(),
                duration_ms: 0,
                restored: true,
            });
        }
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            epoch = manifest.epoch,
            location = %checkpoint.location,
            partitions = manifest.positions.len(),
            "state restored from checkpoint"
        );
        Ok(Some(checkpoint.manifest))
    }

    /// Exactly-once: after restoring state for `inputs`, holds back what this query
    /// published after the output marks `marks` (everything it published, when `None`),
    /// until the replay has read `inputs` up to their present ends. Adds to a replay under way.
    pub(super) async fn replay_from(
        &mut self,
        marks: Option<Vec<Position>>,
        inputs: &[(String, i32)],
    ) -> Result<()> {
        let marks = self.suppress_published(marks).await?;
        let until = self.source.end_offsets(inputs, Duration::from_secs(30))?;
        if let Some(c) = &mut self.checkpoints {
            match &mut c.replay {
                Some(replay) => {
                    replay.until.extend(until);
                    for mark in marks {
                        match replay
                            .marks
                            .iter_mut()
                            .find(|m| m.topic == mark.topic && m.partition == mark.partition)
                        {
                            Some(m) => m.offset = m.offset.min(mark.offset),
                            None => replay.marks.push(mark),
                        }
                    }
                }
                None => c.replay = Some(Replay { until, marks }),
            }
            c.caught_up = None;
        }
        Ok(())
    }

    /// Exactly-once recovery: the ids this query published after the checkpoint's output
    /// marks (all it published, without a checkpoint) are not published again.
    /// Returns where the read-back started, per output partition.
    pub(super) async fn suppress_published(
        &mut self,
        marks: Option<Vec<Position>>,
    ) -> Result<Vec<Position>> {
        let query = self
            .config
            .name
            .clone()
            .unwrap_or_else(|| self.config.group_id.clone());
        let topics = self.output_topics();
        let probe = self.source.probe();
        let partitions = tokio::task::spawn_blocking(move || {
            partitions_of(&probe, &topics, Duration::from_secs(30))
        })
        .await
        .map_err(|e| Error::Checkpoint(format!("metadata task failed: {e}")))??;
        let from: Vec<(String, i32, i64)> = partitions
            .into_iter()
            .map(|(t, p)| {
                let start = marks
                    .as_ref()
                    .and_then(|m| m.iter().find(|x| x.topic == t && x.partition == p))
                    .map_or(0, |x| x.offset);
                (t, p, start)
            })
            .collect();
        debug!(?from, "reading back outputs published after the checkpoint");
        let read_from = from
            .iter()
            .map(|(topic, partition, offset)| Position {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
            })
            .collect();
        let (brokers, properties) = (self.config.brokers.clone(), self.config.properties.clone());
        let from_log_start = self
            .config
            .checkpoint
            .as_ref()
            .is_some_and(|c| c.read_back_from_log_start);
        let ids = tokio::task::spawn_blocking(move || {
            crate::sink::published_ids(
                &brokers,
                &properties,
                &query,
                &from,
                from_log_start,
                Duration::from_secs(60),
            )
        })
        .await
        .map_err(|e| Error::Checkpoint(format!("reading task failed: {e}")))??;
        let records: u32 = ids.values().sum();
        debug!(records, "outputs published after the checkpoint read back");
        if records > 0 {
            info!(
                records,
                "outputs published after the checkpoint will not be published again"
            );
        }
        self.sink.suppress(ids);
        Ok(read_from)
    }

    /// The topics this pipeline writes: its queries' sinks, the DLQ and the late topic.
    pub(super) fn output_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .queries
            .iter()
            .filter_map(|r| r.query.sink().map(|s| s.options.topic.clone()))
            .chain([
                self.config.topics.dlq.clone(),
                self.config.topics.late.clone(),
            ])
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// Takes a checkpoint of everything this member holds: waits for every output's
    /// acknowledgement, commits the epoch's transaction (exactly-once) and writes state,
    /// positions and output marks; at-least-once, commits the positions to the group
    /// afterwards (for lag monitoring).
    pub(super) async fn checkpoint(&mut self) -> Result<()> {
        self.checkpoint_of(None, false).await
    }

    /// Waits for the checkpoint being written, if any, and records it.
    pub(super) async fn finish_writing(&mut self) -> Result<()> {
        let Some(mut w) = self.checkpoints.as_mut().and_then(|c| c.writing.take()) else {
            return Ok(());
        };
        // A store that does not answer holds the query up here (the next checkpoint waits for
        // this one): said every 10 s, rather than stay silent.
        let done = loop {
            match tokio::time::timeout(Duration::from_secs(10), &mut w.task).await {
                Ok(done) => break done,
                Err(_) => tracing::warn!(
                    epoch = w.epoch,
                    waited_s = w.started.elapsed().as_secs(),
                    "a checkpoint is still being written: the query waits for its store"
                ),
            }
        };
        let bytes = done.map_err(|e| Error::Checkpoint(format!("writing task failed: {e}")))??;
        let duration_ms = w.started.elapsed().as_millis() as u64;
        debug!(epoch = w.epoch, bytes, duration_ms, "checkpoint written");
        if let Ok(mut last) = self.stats.last_checkpoint.lock() {
            *last = Some(CheckpointInfo {
                epoch: w.epoch,
                at_ms: w.at_ms,
                bytes,
                duration_ms,
                restored: false,
            });
        }
        Ok(())
    }

    /// Records the checkpoint written in the background once it is done (without waiting).
    pub(super) async fn poll_writing(&mut self) -> Result<()> {
        let done = self
            .checkpoints
            .as_ref()
            .and_then(|c| c.writing.as_ref())
            .is_some_and(|w| w.task.is_finished());
        if done {
            self.finish_writing().await?;
        }
        Ok(())
    }

    /// [`Pipeline::checkpoint`], writing only the given partitions' checkpoints when the
    /// state is per partition (`None`: all held). The files are written in the background
    /// unless `wait` (partitions handed on or taken up, where the next reader must find
    /// them); the previous checkpoint's write is finished before the state is taken.
    pub(super) async fn checkpoint_of(
        &mut self,
        only: Option<&[(String, i32)]>,
        wait: bool,
    ) -> Result<()> {
        if self.checkpoints.is_none() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.settle(true).await?;
        // The source's resume positions: the restored (or starting) ones, moved forward at
        // the end of every micro-batch processed.
        let positions = self.source.positions();
        let taken_at: TakenAt = {
            let changes: Vec<u64> = self
                .queries
                .iter()
                .flat_map(|r| r.instances().into_iter().map(StreamQuery::changes))
                .collect();
            let mut at: Vec<((String, i32), i64)> =
                positions.iter().map(|(k, o)| (k.clone(), *o)).collect();
            at.sort();
            (changes, at)
        };
        if only.is_none()
            && let Some(c) = &self.checkpoints
            && c.written.as_ref() == Some(&taken_at)
            && c.replay.is_none()
        {
            // The newest checkpoint still holds the state: its age (a metric operators alert
            // on) counts from now, once it is written (the one recorded before may be older
            // than the state it holds).
            self.finish_writing().await?;
            if let Some(c) = &mut self.checkpoints {
                c.last = std::time::Instant::now();
            }
            if let Ok(mut last) = self.stats.last_checkpoint.lock()
                && let Some(last) = last.as_mut()
            {
                last.at_ms = epoch_ms();
            }
            return Ok(());
        }
        if self.sink.is_transactional() {
            let group = self.source.group_metadata().ok_or_else(|| {
                Error::Checkpoint("the consumer has no group metadata yet".into())
            })?;
            self.sink.commit_epoch(&positions, group).await?;
        }
        let replay_marks = self
            .checkpoints
            .as_ref()
            .and_then(|c| c.replay.as_ref())
            .map(|r| r.marks.clone());
        let topics = self.output_topics();
        let probe = self.source.probe();
        let outputs = match replay_marks {
            Some(marks) => marks,
            None => tokio::task::spawn_blocking(move || -> Result<Vec<Position>> {
                use rdkafka::consumer::Consumer;
                let mut out = Vec::new();
                for (topic, partition) in partitions_of(&probe, &topics, Duration::from_secs(30))? {
                    let (_, high) =
                        probe.fetch_watermarks(&topic, partition, Duration::from_secs(30))?;
                    out.push(Position {
                        topic,
                        partition,
                        offset: high,
                    });
                }
                Ok(out)
            })
            .await
            .map_err(|e| Error::Checkpoint(format!("output marks task failed: {e}")))??,
        };
        let now = epoch_ms();
        let targets: Vec<Option<(String, i32)>> = if self.partitioned {
            match only {
                Some(list) => list.iter().cloned().map(Some).collect(),
                None => self.held.iter().cloned().map(Some).collect(),
            }
        } else {
            vec![None]
        };
        let mut epoch = 0;
        let mut jobs = Vec::new();
        // One write at a time, in epoch order; and the state is taken only once the previous
        // write has let go of what it read (detector state shared with a write still under
        // way would be copied whole).
        self.finish_writing().await?;
        for key in targets {
            let mut states = Vec::new();
            let mut queries = Vec::new();
            for running in &mut self.queries {
                let repartitioned = running.repartition.is_some();
                let Some((instance, upstream)) = running.instance_for(&key) else {
                    continue;
                };
                let mut state = instance.snapshot(now)?;
                if let (Some(upstream), Some(meta)) = (upstream, state.meta.as_object_mut())
                    && repartitioned
                {
                    let seen: Vec<(i32, i64)> = upstream.iter().map(|(p, o)| (*p, *o)).collect();
                    meta.insert("upstream".into(), serde_json::json!(seen));
                }
                states.push(state);
                queries.push(QueryManifest {
                    name: running.name.clone(),
                    sql: running.query.sql().to_string(),
                    layout: running.query.state_layout(),
                    settings: running.query.settings_sql(),
                    tables: running.query.tables_identity(),
                    meta: serde_json::Value::Null,
                });
            }
            let mut sorted: Vec<Position> = positions
                .iter()
                .filter(|(k, _)| key.as_ref().is_none_or(|key| key == *k))
                .map(|((topic, partition), offset)| Position {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                })
                .collect();
            sorted.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
            let partition_counts = key
                .as_ref()
                .and_then(|(topic, _)| {
                    self.partition_counts
                        .get(topic)
                        .map(|n| [(topic.clone(), *n)].into())
                })
                .unwrap_or_default();
            let Some(c) = &mut self.checkpoints else {
                return Ok(());
            };
            let store = c.store(&key)?;
            let last_epoch = c.stores.get(&key).map_or(0, |s| s.1);
            let manifest = Manifest {
                version: 0,
                epoch: last_epoch.saturating_add(1),
                created_at_ms: now,
                positions: sorted,
                outputs: outputs.clone(),
                queries,
                files: Vec::new(),
                digests: Default::default(),
                partition_counts,
            };
            if let Some(entry) = c.stores.get_mut(&key) {
                entry.1 = manifest.epoch;
            }
            epoch = epoch.max(manifest.epoch);
            jobs.push((store, manifest, states));
        }
        let task = tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut bytes = 0;
            for (store, manifest, states) in jobs {
                bytes += store.write(manifest, states)?.bytes;
            }
            Ok(bytes)
        });
        if let Some(c) = &mut self.checkpoints {
            c.last = std::time::Instant::now();
            // A checkpoint of some partitions leaves the others' as they were.
            c.written = only.is_none().then_some(taken_at);
            c.writing = Some(Writing {
                task,
                started,
                at_ms: now,
                epoch,
            });
        }
        if wait {
            self.finish_writing().await?;
        }
        if !self.sink.is_transactional() {
            // For lag monitoring: the positions of the partitions this member holds (a commit
            // before the group has assigned any would be refused).
            let assigned: std::collections::HashSet<(String, i32)> =
                self.source.assignment().into_iter().collect();
            let commit: HashMap<(Arc<str>, i32), i64> = positions
                .iter()
                .filter(|(k, _)| assigned.contains(*k))
                .map(|((t, p), o)| ((Arc::from(t.as_str()), *p), *o))
                .collect();
            self.source.commit(&commit)?;
        }
        debug!(
            epoch,
            taken_ms = started.elapsed().as_millis() as u64,
            "checkpoint taken"
        );
        Ok(())
    }

    /// Ends output suppression once the replay after recovery has read every input partition
    /// up to where it ended at recovery.
    pub(super) fn check_replay(&mut self) {
        let Some(c) = &mut self.checkpoints else {
            return;
        };
        let Some(replay) = &c.replay else {
            return;
        };
        let positions = self.source.positions();
        let caught_up = replay
            .until
            .iter()
            .all(|(key, end)| positions.get(key).is_some_and(|p| p >= end));
        // Outputs due on processing time (windows closed by a partition going idle, early
        // fires) come after the input has caught up: suppression lasts until every record read
        // back has come again, or for a grace period after catching up.
        let done = match (caught_up, c.caught_up) {
            (false, _) => false,
            (true, None) => {
                c.caught_up = Some(std::time::Instant::now());
                !self.sink.is_suppressing()
            }
            (true, Some(at)) => !self.sink.is_suppressing() || at.elapsed() >= REPLAY_GRACE,
        };
        if done {
            c.caught_up = None;
            c.replay = None;
            let (suppressed, left) = self.sink.end_suppression();
            info!(
                suppressed,
                left,
                "replay after recovery done: outputs published before the restart were not published again"
            );
        }
    }
}

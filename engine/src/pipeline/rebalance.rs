//! The consumer group's partition changes: taking up assigned partitions (their state
//! restored first) and letting revoked ones go (their state checkpointed first).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info};

use super::recovery::positions_of;
use super::{Part, Pipeline, blocking, epoch_ms};
use crate::checkpoint::Position;
use crate::error::{Error, Result};
use crate::source::{PartitionChange, Positions, RawBatch};

/// `topic[0, 1], other[3]`, for logs and messages.
pub(super) fn describe(list: &[(String, i32)]) -> String {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (topic, partition) in list {
        by_topic.entry(topic).or_default().push(*partition);
    }
    by_topic
        .into_iter()
        .map(|(topic, mut partitions)| {
            partitions.sort_unstable();
            let partitions: Vec<String> = partitions.iter().map(i32::to_string).collect();
            format!("{topic}[{}]", partitions.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Pipeline {
    /// Carries out the group's partition changes since the last micro-batch: takes up newly
    /// assigned partitions (restoring their state) and lets revoked ones go (checkpointing
    /// theirs first). Partitions lost with the group session stop the pipeline
    /// ([`Error::Rebalanced`]), to start again from its checkpoints or committed offsets: the
    /// group may have given them to another member already.
    pub(super) async fn rebalance(&mut self) -> Result<()> {
        // Each change stays queued until carried out: a pipeline whose task is aborted while
        // it carries one out (a stop that waited too long) leaves it for the consumer's drop
        // to answer, as it does the ones after it.
        while let Some(change) = self.source.next_change() {
            let done = match &change {
                PartitionChange::Assigned(list) => self.take(list.clone()).await,
                PartitionChange::Revoked(list) => self.release(list.clone()).await,
                PartitionChange::Lost(list) => Err(Error::Rebalanced(format!(
                    "the session in consumer group {} expired and its partitions were lost ({})",
                    self.config.group_id,
                    describe(list)
                ))),
            };
            if let Err(e) = done {
                // The group waits for each change to be answered, and the consumer's close
                // waited for good on one left unanswered: this one and those after it are
                // answered before the pipeline stops.
                let unanswered = self.source.rebalances();
                blocking(|| {
                    for change in &unanswered {
                        self.source.answer(change);
                    }
                });
                return Err(e);
            }
            self.source.carried_out();
        }
        Ok(())
    }

    /// Takes up partitions the group assigned: with one state per partition, plans each
    /// query's instance for it and restores its newest checkpoint (exactly-once: holding
    /// back what was published after it); then starts fetching them, each at its restored
    /// position (its committed offset otherwise), and checkpoints them at once.
    pub(super) async fn take(&mut self, list: Vec<(String, i32)>) -> Result<()> {
        if !self.partitioned {
            // One state for all partitions: the positions restored at start apply. Each
            // partition taken up holds the watermark until it has delivered (or gone idle),
            // so that its backlog is not late against partitions that delivered first.
            let now = epoch_ms();
            for running in &mut self.queries {
                for (topic, partition) in &list {
                    if running.reads(topic) {
                        running.query.expect_topic_partition(topic, *partition, now);
                    }
                }
            }
            blocking(|| self.source.assign(&list))?;
            // Which of them have a backlog, at once: those hold the watermark while others
            // are read first.
            self.source.measure_lag(
                self.stats.consumer_lag.clone(),
                self.stats.consumer_lag_at.clone(),
            );
            self.held.extend(list);
            return Ok(());
        }
        let now = epoch_ms();
        let counts = blocking(|| self.partition_counts_now(&list))?;
        // A repartitioned query's input may have had fewer partitions (none: it did not exist
        // yet) when the pipeline started: its second stage waits for every partition it has
        // now (it waited for the first only, and the others' records, passed on after the
        // first's progress, were late).
        for running in &mut self.queries {
            if let Some(r) = &mut running.repartition
                && let Some(n) = counts.get(&r.input).and_then(|n| u32::try_from(*n).ok())
                && n > r.inputs
            {
                for part in running.parts.values_mut() {
                    for p in r.inputs..n {
                        part.query.expect_partition(p as i32, now);
                    }
                }
                info!(
                    input = %r.input,
                    from = r.inputs,
                    to = n,
                    "the repartitioned query's input has more partitions than at start"
                );
                r.inputs = n;
            }
        }
        let mut positions = Positions::new();
        let mut marks: Option<Vec<Position>> = None;
        let mut restored = Vec::new();
        let mut fresh = Vec::new();
        for key in &list {
            self.ensure_parts(key, now).await?;
            if self.checkpoints.is_none() {
                continue;
            }
            match self.restore(Some(key.clone()), now).await? {
                Some(manifest) => {
                    // A second stage's restored watermark knows the input partitions as
                    // they were at the checkpoint (one silent then is idle at once): each
                    // holds it again until it delivers, as for an instance just planned.
                    for running in &mut self.queries {
                        if let Some(r) = &running.repartition
                            && running.topic() == key.0
                            && let Some(part) = running.parts.get_mut(&key.1)
                        {
                            part.query.expect_inputs(r.inputs, now);
                        }
                    }
                    if let Some(then) = manifest.partition_counts.get(&key.0) {
                        self.check_partition_count(&key.0, *then, &counts)?;
                    }
                    positions.extend(positions_of(&manifest));
                    let m = marks.get_or_insert_with(|| manifest.outputs.clone());
                    for mark in &manifest.outputs {
                        match m
                            .iter_mut()
                            .find(|x| x.topic == mark.topic && x.partition == mark.partition)
                        {
                            Some(x) => x.offset = x.offset.min(mark.offset),
                            None => m.push(mark.clone()),
                        }
                    }
                    restored.push(key.clone());
                }
                None => fresh.push(key.clone()),
            }
        }
        if !fresh.is_empty() {
            blocking(|| self.refuse_state_elsewhere(&fresh))?;
            positions.extend(blocking(|| {
                self.source
                    .starting_positions(&fresh, Duration::from_secs(30))
            })?);
        }
        let mut all = self.source.positions();
        all.extend(positions);
        self.source.set_positions(all);
        if self.sink.is_transactional() && !restored.is_empty() {
            self.replay_from(marks, &restored).await?;
        }
        blocking(|| self.source.assign(&list))?;
        // Stage 2 is told whether the input partitions taken up are behind once a lag
        // measurement begun after this has reached them; either way it is told at once then
        // (one that is not behind is said to have caught up, whatever an earlier holder
        // said).
        let from = self.source.lag_measurements() + 1;
        for running in &mut self.queries {
            if let Some(r) = &mut running.repartition {
                for (topic, p) in &list {
                    if *topic == r.input {
                        r.announced.insert(
                            *p,
                            super::repartition::Announced {
                                behind: true,
                                at: i64::MIN,
                                from,
                            },
                        );
                    }
                }
            }
        }
        self.source.measure_lag(
            self.stats.consumer_lag.clone(),
            self.stats.consumer_lag_at.clone(),
        );
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            partitions = %describe(&list),
            restored = restored.len(),
            "partitions taken up"
        );
        self.held.extend(list.iter().cloned());
        self.checkpoint_of(Some(&list), true).await
    }

    /// The partition counts of the topics of `list` now, checked against the counts when this
    /// member last took up partitions: a topic that gained partitions while its state is
    /// split by partition fails the query ([`Pipeline::check_partition_count`]).
    fn partition_counts_now(&mut self, list: &[(String, i32)]) -> Result<HashMap<String, i32>> {
        // A short blocking call, like the offset lookups below: the topics' metadata.
        let all = self.source.topic_partitions(Duration::from_secs(30))?;
        let mut counts: HashMap<String, i32> = HashMap::new();
        for (topic, partition) in all {
            let n = counts.entry(topic).or_default();
            *n = (*n).max(partition + 1);
        }
        for (topic, _) in list {
            if let Some(then) = self.partition_counts.get(topic).copied() {
                self.check_partition_count(topic, then, &counts)?;
            }
        }
        for (topic, _) in list {
            if let Some(n) = counts.get(topic) {
                self.partition_counts.insert(topic.clone(), *n);
            }
        }
        Ok(counts)
    }

    /// Fails when `topic`, whose state was split over `then` partitions, has another count
    /// now and a query keeps state per partition of it: the records of a key would now reach
    /// another partition than the one holding its state, and split its windows in two.
    pub(super) fn check_partition_count(
        &self,
        topic: &str,
        then: i32,
        counts: &HashMap<String, i32>,
    ) -> Result<()> {
        let Some(now) = counts.get(topic).copied() else {
            return Ok(());
        };
        if now == then {
            return Ok(());
        }
        let Some(running) = self
            .queries
            .iter()
            .find(|r| r.topic() == topic && r.query.holds_state())
        else {
            return Ok(());
        };
        Err(Error::Checkpoint(format!(
            "{topic} has {now} partitions, but query {} keeps its state split over the {then} \
             it had: the records of a key may now reach another partition than the one \
             holding its state, which would split its windows in two. Re-splitting state over \
             a new partition count is not supported yet, and Kafka cannot take partitions \
             away: drop and re-create the query to start afresh from the group's offsets",
            running.name
        )))
    }

    /// Lets partitions the group revoked go: with one state per partition, checkpoints their
    /// state (or, without checkpoints, commits their offsets, held back to what their open
    /// windows need) once every output is acknowledged, drops it and releases them. With one
    /// state for all partitions the pipeline cannot go on: without checkpoints it starts
    /// again from its committed offsets; with them, the query fails with the reason.
    pub(super) async fn release(&mut self, list: Vec<(String, i32)>) -> Result<()> {
        let group = &self.config.group_id;
        if !self.partitioned {
            if self.checkpoints.is_none() {
                return Err(Error::Rebalanced(format!(
                    "another member of consumer group {group} took partitions from this one"
                )));
            }
            return Err(Error::Checkpoint(format!(
                "another process joined consumer group {group} and took partitions ({}) from \
                 this one; this query groups by something other than its input topic's key, \
                 so one state holds all its partitions and it runs in one process per group",
                describe(&list)
            )));
        }
        if self.checkpoints.is_some() {
            self.checkpoint_of(Some(&list), true).await?;
        } else {
            self.settle(true).await?;
            let committable = self.committable();
            let revoked: HashMap<(Arc<str>, i32), i64> = committable
                .into_iter()
                .filter(|((t, p), _)| list.iter().any(|(lt, lp)| **t == **lt && p == lp))
                .collect();
            self.source.commit_sync(&revoked)?;
        }
        for running in &mut self.queries {
            for (topic, partition) in &list {
                if running.topic() == topic {
                    running.parts.remove(partition);
                }
            }
        }
        let keys: Vec<(Arc<str>, i32)> = list
            .iter()
            .map(|(t, p)| (Arc::from(t.as_str()), *p))
            .collect();
        for key in &keys {
            self.next_offsets.remove(key);
            self.committed.remove(key);
            self.committable_acked.remove(key);
        }
        if let Some(replay) = self.checkpoints.as_mut().and_then(|c| c.replay.as_mut()) {
            for key in &list {
                replay.until.remove(key);
            }
        }
        for key in &list {
            self.held.remove(key);
            for running in &mut self.queries {
                if let Some(r) = &mut running.repartition
                    && r.input == key.0
                {
                    r.announced.remove(&key.1);
                }
            }
        }
        self.source.forget_positions(&list);
        self.source.unassign(&list)?;
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            partitions = %describe(&list),
            "partitions handed on"
        );
        Ok(())
    }

    /// Plans, for each query reading `key`'s topic, its instance for `key`'s partition if
    /// it has none yet.
    pub(super) async fn ensure_parts(&mut self, key: &(String, i32), now: i64) -> Result<()> {
        for running in &mut self.queries {
            if running.topic() != key.0 || running.parts.contains_key(&key.1) {
                continue;
            }
            let mut query = running.query.replan(&self.ctx).await?;
            if let Some(r) = &running.repartition {
                query.set_owner(r.partitions, u32::try_from(key.1).unwrap_or_default());
                query.expect_inputs(r.inputs, now);
            }
            running.parts.insert(
                key.1,
                Part {
                    query,
                    since_ms: now,
                    upstream: BTreeMap::new(),
                    behind_inputs: BTreeMap::new(),
                },
            );
        }
        Ok(())
    }

    /// The records of `raw` from partitions this member holds.
    pub(super) fn held_only(&self, raw: RawBatch) -> RawBatch {
        let mine: std::collections::HashSet<i32> = self
            .held
            .iter()
            .filter(|(t, _)| **t == *raw.topic)
            .map(|(_, p)| *p)
            .collect();
        let held = |p: i32| mine.contains(&p);
        if raw.partitions.iter().all(|p| held(*p)) && raw.progress.iter().all(|p| held(p.partition))
        {
            return raw;
        }
        let mut out = RawBatch::new(raw.topic.clone());
        out.first_received = raw.first_received;
        for i in 0..raw.len() {
            if held(raw.partitions[i]) {
                out.push_from(&raw, i);
            }
        }
        out.progress = raw
            .progress
            .iter()
            .filter(|p| held(p.partition))
            .copied()
            .collect();
        debug!(
            dropped = raw.len() - out.len(),
            "records of partitions handed on left to their new owner"
        );
        out
    }
}

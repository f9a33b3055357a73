//! A map a checkpoint can take whole at once while the query goes on changing it.
//!
//! [`Layered::share`] hands out the map as it is (one reference count, whatever its size);
//! until every holder has let it go, changes land in a second map in front of it, each entry
//! copied there the first time it changes. Once the shared map is back in sole hands, the
//! changes are folded into it a few at a time ([`Layered::settle`]), so that no single
//! micro-batch pays for every change made while a checkpoint was read out. A map made
//! [`Layered::with_spares`] keeps the entries they replace (at most one an entry) for the
//! copies of the next share: a copy is made into one with [`Clone::clone_from`], which reuses
//! its buffers, so copying a large entry does not touch fresh memory each checkpoint (page
//! faults, which cost several times the copy).

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::Arc;

use datafusion::common::HashMap;
use datafusion::common::hash_map::Entry;

/// The map as [`Layered::share`] hands it out.
pub type Shared<K, V> = Arc<HashMap<K, V>>;

/// A map that can be shared with readers in O(1); see the module doc.
#[derive(Debug)]
pub struct Layered<K, V> {
    /// The entries, shared with the readers of the last [`Layered::share`] while they hold it.
    base: Shared<K, V>,
    /// Entries changed while `base` was shared, not yet folded into it: `None` where removed.
    changes: HashMap<K, Option<V>>,
    /// With [`Layered::with_spares`]: entries replaced when changes were folded in, kept to
    /// copy the next changed entries into ([`Clone::clone_from`]), so that a copy reuses
    /// their buffers instead of touching fresh memory. At most as many as there are entries.
    spare: Vec<V>,
    /// Whether replaced entries are kept in `spare`.
    spares: bool,
    len: usize,
}

impl<K, V> Default for Layered<K, V> {
    fn default() -> Self {
        Self {
            base: Arc::default(),
            changes: HashMap::new(),
            spare: Vec::new(),
            spares: false,
            len: 0,
        }
    }
}

impl<K, V> Layered<K, V> {
    /// An empty map that keeps the entries its folds replace, at most one an entry, and
    /// makes the copies of the next share into them: for large entries whose
    /// [`Clone::clone_from`] reuses their buffers, changed in place ([`Layered::get_mut`]).
    /// They take memory while no share is held: see [`Layered::spares`].
    pub fn with_spares() -> Self {
        Self {
            spares: true,
            ..Self::default()
        }
    }

    /// The entries kept for copies ([`Layered::with_spares`]), to count their memory.
    pub fn spares(&self) -> impl Iterator<Item = &V> {
        self.spare.iter()
    }

    /// How many replaced entries a fold may keep: one an entry, with spares.
    fn spares_kept(&self) -> usize {
        if self.spares { self.len } else { 0 }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Layered<K, V> {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Changes not yet folded into the shared map.
    pub fn unsettled(&self) -> usize {
        self.changes.len()
    }

    /// The entry of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // Most of the time nothing waits in front: the key is not hashed for it then.
        if !self.changes.is_empty()
            && let Some(changed) = self.changes.get(key)
        {
            return changed.as_ref();
        }
        self.base.get(key)
    }

    /// Whether `key` has an entry.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// The entry of `key`, to change: copied in front of the shared map first while a reader
    /// holds that.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.changes.is_empty() || !self.changes.contains_key(key) {
            if Arc::get_mut(&mut self.base).is_some() {
                return Arc::get_mut(&mut self.base)?.get_mut(key);
            }
            let (k, v) = self.base.get_key_value(key)?;
            let copy = copy(&mut self.spare, v);
            self.changes.insert(k.clone(), Some(copy));
        }
        self.changes.get_mut(key)?.as_mut()
    }

    /// Sets the entry of `key`; the entry.
    pub fn insert(&mut self, key: K, value: V) -> &mut V {
        if !self.contains_key(&key) {
            self.len += 1;
        }
        if self.changes.contains_key(&key) || Arc::get_mut(&mut self.base).is_none() {
            return self.changes.entry(key).or_default().insert(value);
        }
        match Arc::make_mut(&mut self.base).entry(key) {
            Entry::Occupied(mut entry) => {
                entry.insert(value);
                entry.into_mut()
            }
            Entry::Vacant(entry) => entry.insert(value),
        }
    }

    /// Sets the entry of `key`; the entry it replaces. While a reader holds the map, the
    /// replaced entry is a copy of the reader's.
    pub fn replace(&mut self, key: K, value: V) -> Option<V> {
        let waiting = !self.changes.is_empty() && self.changes.contains_key(&key);
        let previous = if waiting {
            self.changes.insert(key, Some(value)).flatten()
        } else if let Some(base) = Arc::get_mut(&mut self.base) {
            base.insert(key, value)
        } else {
            let previous = self.base.get(&key).cloned();
            self.changes.insert(key, Some(value));
            previous
        };
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// Drops the entry of `key`; the entry. While a reader holds the map, the entry is a copy
    /// of the reader's.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let waiting = if self.changes.is_empty() {
            None
        } else {
            self.changes.remove(key)
        };
        // A change waiting in front is newer than the map's entry.
        let previous = match Arc::get_mut(&mut self.base) {
            Some(base) => waiting.unwrap_or(base.remove(key)),
            None => {
                let held = self.base.get_key_value(key);
                if let Some((k, _)) = held {
                    self.changes.insert(k.clone(), None);
                }
                waiting.unwrap_or_else(|| held.map(|(_, v)| v.clone()))
            }
        };
        if previous.is_some() {
            self.len -= 1;
            self.spare.truncate(self.len);
        }
        previous
    }

    /// The entry of `key`, set to `make()` first when it has none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        // Most of the time nothing is shared or waits in front: one lookup.
        if self.changes.is_empty() && Arc::get_mut(&mut self.base).is_some() {
            return match Arc::make_mut(&mut self.base).entry(key) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    self.len += 1;
                    entry.insert(make())
                }
            };
        }
        if !self.contains_key(&key) {
            return self.insert(key, make());
        }
        if !self.changes.contains_key(&key) && Arc::get_mut(&mut self.base).is_none() {
            let copy = self.base.get(&key).map(|v| copy(&mut self.spare, v));
            self.changes.insert(key.clone(), copy);
        }
        if self.changes.contains_key(&key) {
            return self
                .changes
                .entry(key)
                .or_default()
                .get_or_insert_with(make);
        }
        // Not shared (checked above): no copy is made.
        Arc::make_mut(&mut self.base)
            .entry(key)
            .or_insert_with(make)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let changed = self
            .changes
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)));
        let kept = self
            .base
            .iter()
            .filter(|(k, _)| self.changes.is_empty() || !self.changes.contains_key(*k));
        changed.chain(kept)
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Keeps only the entries for which `keep` holds.
    pub fn retain(&mut self, keep: impl Fn(&V) -> bool) {
        if self.changes.is_empty()
            && let Some(base) = Arc::get_mut(&mut self.base)
        {
            base.retain(|_, v| keep(v));
            self.len = base.len();
            self.spare.truncate(self.len);
            return;
        }
        let dropped: Vec<K> = self
            .iter()
            .filter(|(_, v)| !keep(v))
            .map(|(k, _)| k.clone())
            .collect();
        self.len -= dropped.len();
        self.spare.truncate(self.len);
        for k in dropped {
            match Arc::get_mut(&mut self.base) {
                Some(base) => {
                    base.remove(&k);
                    self.changes.remove(&k);
                }
                None => {
                    self.changes.insert(k, None);
                }
            }
        }
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.changes.clear();
        self.spare = Vec::new();
        match Arc::get_mut(&mut self.base) {
            Some(base) => base.clear(),
            None => self.base = Arc::default(),
        }
        self.len = 0;
    }

    /// Folds up to `n` changes into the map they were made in front of, once no reader holds
    /// it any more; returns the changes still waiting.
    pub fn settle(&mut self, n: usize) -> usize {
        if self.changes.is_empty() {
            return 0;
        }
        let keep = self.spares_kept();
        let Some(base) = Arc::get_mut(&mut self.base) else {
            return self.changes.len();
        };
        if n >= self.changes.len() {
            fold(base, self.changes.drain(), &mut self.spare, keep);
        } else {
            let keys: Vec<K> = self.changes.keys().take(n).cloned().collect();
            let taken: Vec<(K, Option<V>)> = keys
                .into_iter()
                .filter_map(|k| self.changes.remove_entry(&k))
                .collect();
            fold(base, taken, &mut self.spare, keep);
        }
        self.changes.len()
    }

    /// Folds back what a micro-batch of `rows` rows should before it changes the map: at
    /// least twice its rows (so that changes waiting since a checkpoint catch up, a
    /// micro-batch adding at most its rows) and at least [`Layered::SETTLE`], not all at once.
    pub fn settle_before(&mut self, rows: usize) -> usize {
        self.settle(Self::SETTLE.max(2 * rows))
    }

    /// Changes folded back before a micro-batch, at least.
    pub const SETTLE: usize = 16_384;

    /// The map as it is now, shared: O(1) when the changes have been folded into a map no
    /// reader holds any more. Otherwise they are folded in now, into a copy when a reader of
    /// an earlier share still holds the map.
    pub fn share(&mut self) -> Shared<K, V> {
        if !self.changes.is_empty() {
            let changes = std::mem::take(&mut self.changes);
            let keep = self.spares_kept();
            fold(
                Arc::make_mut(&mut self.base),
                changes,
                &mut self.spare,
                keep,
            );
        }
        Arc::clone(&self.base)
    }
}

/// A copy of `v`, made into a spare entry when there is one.
fn copy<V: Clone>(spare: &mut Vec<V>, v: &V) -> V {
    match spare.pop() {
        Some(mut into) => {
            into.clone_from(v);
            into
        }
        None => v.clone(),
    }
}

/// Folds `changes` into `base`; the entries they replace are kept in `spare` while it holds
/// fewer than `keep`.
fn fold<K: Eq + Hash, V>(
    base: &mut HashMap<K, V>,
    changes: impl IntoIterator<Item = (K, Option<V>)>,
    spare: &mut Vec<V>,
    keep: usize,
) {
    for (k, v) in changes {
        let replaced = match v {
            Some(v) => base.insert(k, v),
            None => base.remove(&k),
        };
        if let Some(old) = replaced
            && spare.len() < keep
        {
            spare.push(old);
        }
    }
}

/// Counts as [`LayeredCounts::share`] hands them out.
pub type SharedCounts<K> = Arc<BTreeMap<K, u64>>;

/// A multiset in key order (each key with a count) that a checkpoint takes whole at once
/// while the query goes on changing it, as [`Layered`] does for a map: while a reader holds
/// the shared map, a change waits in front of it as a difference of the key's count, and
/// reading merges the two in key order. Only the keys changed meanwhile are copied, however
/// the changes spread over the keys.
#[derive(Debug)]
pub struct LayeredCounts<K> {
    /// Keys with a count of at least one, shared with the readers of the last
    /// [`LayeredCounts::share`] while they hold it.
    base: SharedCounts<K>,
    /// Changes of a key's count made while `base` was shared, not yet folded into it.
    deltas: BTreeMap<K, i64>,
    /// Keys with a count of at least one.
    len: usize,
}

impl<K> Default for LayeredCounts<K> {
    fn default() -> Self {
        Self {
            base: Arc::default(),
            deltas: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<K: Ord + Clone> LayeredCounts<K> {
    /// Keys with a count of at least one.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no key is counted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Changes not yet folded into the shared map.
    pub fn unsettled(&self) -> usize {
        self.deltas.len()
    }

    /// The count of `key`.
    pub fn count<Q>(&self, key: &Q) -> u64
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let held = self.base.get(key).copied().unwrap_or(0);
        let delta = self.deltas.get(key).copied().unwrap_or(0);
        held.saturating_add_signed(delta)
    }

    /// Counts `key` once more.
    pub fn add<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q> + From<Q::Owned>,
        Q: Ord + ToOwned + ?Sized,
    {
        let new = if let Some(base) = self.unshared_base(key) {
            // One walk of the tree: a key counted once more is most often a new one.
            let n = base.entry(K::from(key.to_owned())).or_insert(0);
            *n += 1;
            *n == 1
        } else {
            let new = self.count(key) == 0;
            self.change(key, 1);
            new
        };
        if new {
            self.len += 1;
        }
    }

    /// Counts `key` once less; false when it was not counted.
    pub fn remove_one<Q>(&mut self, key: &Q) -> bool
    where
        K: Borrow<Q> + From<Q::Owned>,
        Q: Ord + ToOwned + ?Sized,
    {
        let gone = if let Some(base) = self.unshared_base(key) {
            // One walk of the tree when the key goes, as it most often does.
            match base.remove_entry(key) {
                None => return false,
                Some((k, n)) if n > 1 => {
                    base.insert(k, n - 1);
                    false
                }
                Some(_) => true,
            }
        } else {
            match self.count(key) {
                0 => return false,
                n => {
                    self.change(key, -1);
                    n == 1
                }
            }
        };
        if gone {
            self.len -= 1;
        }
        true
    }

    /// The map to change `key` in directly when no reader holds it, with the change waiting
    /// for `key` folded in first.
    fn unshared_base<Q>(&mut self, key: &Q) -> Option<&mut BTreeMap<K, u64>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let base = Arc::get_mut(&mut self.base)?;
        if !self.deltas.is_empty()
            && let Some((k, delta)) = self.deltas.remove_entry(key)
        {
            fold_count(base, k, delta);
        }
        Some(base)
    }

    fn change<Q>(&mut self, key: &Q, by: i64)
    where
        K: Borrow<Q> + From<Q::Owned>,
        Q: Ord + ToOwned + ?Sized,
    {
        match self.deltas.get_mut(key) {
            Some(d) => *d += by,
            None => {
                self.deltas.insert(K::from(key.to_owned()), by);
            }
        }
    }

    /// Sets the count of `key` (at least one), as restoring a checkpoint does.
    pub fn insert(&mut self, key: K, count: u64) {
        if count == 0 {
            return;
        }
        if self.count(&key) == 0 {
            self.len += 1;
        }
        self.deltas.remove(&key);
        Arc::make_mut(&mut self.base).insert(key, count);
    }

    /// Every key with its count, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, u64)> {
        let mut base = self.base.iter().peekable();
        let mut deltas = self.deltas.iter().peekable();
        std::iter::from_fn(move || {
            loop {
                let next = match (base.peek(), deltas.peek()) {
                    (None, None) => return None,
                    (Some(_), None) => base.next().map(|(k, n)| (k, *n)),
                    (None, Some(_)) => deltas
                        .next()
                        .map(|(k, d)| (k, 0u64.saturating_add_signed(*d))),
                    (Some((bk, _)), Some((dk, _))) => match bk.cmp(dk) {
                        std::cmp::Ordering::Less => base.next().map(|(k, n)| (k, *n)),
                        std::cmp::Ordering::Greater => deltas
                            .next()
                            .map(|(k, d)| (k, 0u64.saturating_add_signed(*d))),
                        std::cmp::Ordering::Equal => {
                            let (k, n) = base.next()?;
                            let (_, d) = deltas.next()?;
                            Some((k, n.saturating_add_signed(*d)))
                        }
                    },
                };
                match next {
                    Some((_, 0)) => continue,
                    other => return other,
                }
            }
        })
    }

    /// Drops every key.
    pub fn clear(&mut self) {
        self.deltas.clear();
        match Arc::get_mut(&mut self.base) {
            Some(base) => base.clear(),
            None => self.base = Arc::default(),
        }
        self.len = 0;
    }

    /// Folds up to `n` changes into the map they were made in front of, once no reader holds
    /// it any more; returns the changes still waiting.
    pub fn settle(&mut self, n: usize) -> usize {
        if self.deltas.is_empty() {
            return 0;
        }
        let Some(base) = Arc::get_mut(&mut self.base) else {
            return self.deltas.len();
        };
        for _ in 0..n {
            let Some((k, delta)) = self.deltas.pop_first() else {
                break;
            };
            fold_count(base, k, delta);
        }
        self.deltas.len()
    }

    /// The counts as they are now, shared: O(1) when the changes have been folded into a map
    /// no reader holds any more. Otherwise they are folded in now, into a copy when a reader
    /// of an earlier share still holds the map.
    pub fn share(&mut self) -> SharedCounts<K> {
        if !self.deltas.is_empty() {
            let base = Arc::make_mut(&mut self.base);
            for (k, delta) in std::mem::take(&mut self.deltas) {
                fold_count(base, k, delta);
            }
        }
        Arc::clone(&self.base)
    }
}

/// Applies a change of `delta` to the count of `key` in `base`.
fn fold_count<K: Ord>(base: &mut BTreeMap<K, u64>, key: K, delta: i64) {
    match base.entry(key) {
        std::collections::btree_map::Entry::Occupied(mut held) => {
            match held.get().saturating_add_signed(delta) {
                0 => {
                    held.remove();
                }
                n => *held.get_mut() = n,
            }
        }
        std::collections::btree_map::Entry::Vacant(free) => {
            if delta > 0 {
                free.insert(delta.unsigned_abs());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u32),
        Change(u8, u32),
        Replace(u8, u32),
        Remove(u8),
        /// Drops the entries whose value is a multiple of this.
        Retain(u32),
        Clear,
        /// Shares the map with a reader, who holds it for this many operations.
        Share(u8),
        Settle(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..24, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            4 => (0u8..24, any::<u32>()).prop_map(|(k, v)| Op::Change(k, v)),
            3 => (0u8..24, any::<u32>()).prop_map(|(k, v)| Op::Replace(k, v)),
            2 => (0u8..24).prop_map(Op::Remove),
            1 => (2u32..6).prop_map(Op::Retain),
            1 => Just(Op::Clear),
            2 => (0u8..12).prop_map(Op::Share),
            2 => (0u8..8).prop_map(Op::Settle),
        ]
    }

    /// A share still held: what the map held when it was taken, the share, and for how many
    /// more operations it is held.
    type Reader = (HashMap<u8, u32>, Arc<HashMap<u8, u32>>, u8);

    proptest! {
        /// The map reads as a plain map given the same operations, whenever it is shared and
        /// settled; each share holds what the map held at that moment for as long as it is
        /// held, whatever changes after it.
        #[test]
        fn a_layered_map_reads_as_a_plain_map_and_shares_read_as_taken(
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let mut layered: Layered<u8, u32> = Layered::default();
            let mut model: HashMap<u8, u32> = HashMap::new();
            let mut readers: Vec<Reader> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        layered.insert(k, v);
                        model.insert(k, v);
                    }
                    Op::Change(k, v) => {
                        prop_assert_eq!(layered.get_mut(&k).map(|x| { *x = v; }), model.get_mut(&k).map(|x| { *x = v; }));
                        let got = *layered.get_or_insert_with(k, || v ^ 1);
                        prop_assert_eq!(got, *model.entry(k).or_insert(v ^ 1));
                    }
                    Op::Replace(k, v) => {
                        prop_assert_eq!(layered.replace(k, v), model.insert(k, v));
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(layered.remove(&k), model.remove(&k));
                    }
                    Op::Retain(m) => {
                        layered.retain(|v| v % m != 0);
                        model.retain(|_, v| *v % m != 0);
                    }
                    Op::Clear => {
                        layered.clear();
                        model.clear();
                    }
                    Op::Share(hold) => {
                        let shared = layered.share();
                        prop_assert_eq!(&*shared, &model);
                        readers.push((model.clone(), shared, hold));
                    }
                    Op::Settle(n) => {
                        layered.settle(usize::from(n));
                    }
                }
                for (taken, shared, _) in &readers {
                    prop_assert_eq!(&**shared, taken);
                }
                readers.retain_mut(|(_, _, hold)| {
                    *hold = hold.saturating_sub(1);
                    *hold > 0
                });
                prop_assert_eq!(layered.len(), model.len());
                let mut read: Vec<(u8, u32)> = layered.iter().map(|(k, v)| (*k, *v)).collect();
                read.sort_unstable();
                let mut want: Vec<(u8, u32)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                want.sort_unstable();
                prop_assert_eq!(read, want);
                for k in 0..24u8 {
                    prop_assert_eq!(layered.get(&k), model.get(&k));
                }
            }
            drop(readers);
            layered.settle(usize::MAX);
            prop_assert_eq!(layered.unsettled(), 0);
            prop_assert_eq!(&*layered.share(), &model);
        }
    }

    #[derive(Debug, Clone)]
    enum CountOp {
        Add(u8),
        RemoveOne(u8),
        Insert(u8, u64),
        Clear,
        /// Shares the counts with a reader, who holds them for this many operations.
        Share(u8),
        Settle(u8),
    }

    fn count_op() -> impl Strategy<Value = CountOp> {
        prop_oneof![
            6 => (0u8..24).prop_map(CountOp::Add),
            5 => (0u8..24).prop_map(CountOp::RemoveOne),
            1 => (0u8..24, 1u64..4).prop_map(|(k, n)| CountOp::Insert(k, n)),
            1 => Just(CountOp::Clear),
            2 => (0u8..12).prop_map(CountOp::Share),
            2 => (0u8..8).prop_map(CountOp::Settle),
        ]
    }

    /// A share of counts still held: what they were when taken, the share, and for how many
    /// more operations it is held.
    type CountReader = (BTreeMap<u8, u64>, Arc<BTreeMap<u8, u64>>, u8);

    proptest! {
        /// The counts read as a plain ordered map of counts given the same operations,
        /// whenever they are shared and settled, in key order; each share holds the counts
        /// as they were when taken for as long as it is held.
        #[test]
        fn layered_counts_read_as_plain_counts_in_order_and_shares_read_as_taken(
            ops in proptest::collection::vec(count_op(), 1..160),
        ) {
            let mut layered: LayeredCounts<u8> = LayeredCounts::default();
            let mut model: BTreeMap<u8, u64> = BTreeMap::new();
            let mut readers: Vec<CountReader> = Vec::new();
            for op in ops {
                match op {
                    CountOp::Add(k) => {
                        layered.add(&k);
                        *model.entry(k).or_insert(0) += 1;
                    }
                    CountOp::RemoveOne(k) => {
                        let held = model.get(&k).copied().unwrap_or(0);
                        prop_assert_eq!(layered.remove_one(&k), held > 0);
                        match held {
                            0 => {}
                            1 => {
                                model.remove(&k);
                            }
                            _ => {
                                model.insert(k, held - 1);
                            }
                        }
                    }
                    CountOp::Insert(k, n) => {
                        layered.insert(k, n);
                        model.insert(k, n);
                    }
                    CountOp::Clear => {
                        layered.clear();
                        model.clear();
                    }
                    CountOp::Share(hold) => {
                        let shared = layered.share();
                        prop_assert_eq!(&*shared, &model);
                        readers.push((model.clone(), shared, hold));
                    }
                    CountOp::Settle(n) => {
                        layered.settle(usize::from(n));
                    }
                }
                for (taken, shared, _) in &readers {
                    prop_assert_eq!(&**shared, taken);
                }
                readers.retain_mut(|(_, _, hold)| {
                    *hold = hold.saturating_sub(1);
                    *hold > 0
                });
                prop_assert_eq!(layered.len(), model.len());
                let read: Vec<(u8, u64)> = layered.iter().map(|(k, n)| (*k, n)).collect();
                let want: Vec<(u8, u64)> = model.iter().map(|(k, n)| (*k, *n)).collect();
                prop_assert_eq!(read, want);
                for k in 0..24u8 {
                    prop_assert_eq!(layered.count(&k), model.get(&k).copied().unwrap_or(0));
                }
            }
            drop(readers);
            layered.settle(usize::MAX);
            prop_assert_eq!(layered.unsettled(), 0);
            prop_assert_eq!(&*layered.share(), &model);
        }
    }

    /// Counts changed while shared wait in front as differences, only for the keys changed,
    /// and are folded in once the reader lets go.
    #[test]
    fn counts_changed_while_shared_wait_per_key_changed() {
        let mut counts: LayeredCounts<u32> = LayeredCounts::default();
        for k in 0..1_000 {
            counts.add(&k);
        }
        let shared = counts.share();
        for k in (0..1_000).step_by(10) {
            counts.add(&k);
            assert!(counts.remove_one(&(k + 1)));
        }
        assert_eq!(counts.unsettled(), 200, "only the keys changed wait");
        assert_eq!(counts.settle(50), 200, "the reader still holds the counts");
        assert_eq!(shared.get(&0), Some(&1));
        assert_eq!(shared.get(&1), Some(&1));
        assert_eq!(counts.count(&0), 2);
        assert_eq!(counts.count(&1), 0);
        assert_eq!(counts.len(), 900);
        drop(shared);
        assert_eq!(counts.settle(50), 150);
        assert_eq!(counts.settle(usize::MAX), 0);
        assert_eq!(counts.iter().count(), 900);
        assert_eq!(counts.count(&10), 2);
    }

    /// With spares, an entry copied while the map is shared goes into an entry that an
    /// earlier fold replaced (its buffer reused, not fresh memory) and holds exactly what it
    /// copied, whether the spare was longer or shorter; no more spares are kept than there
    /// are entries; a map without spares keeps none.
    #[test]
    fn a_copy_reuses_an_entry_a_fold_replaced() {
        let mut map: Layered<u32, Vec<u64>> = Layered::with_spares();
        let mut plain: Layered<u32, Vec<u64>> = Layered::default();
        // Entries of 40 to 89 values, changed to 64 to 72 while shared: the spares (the
        // entries as they were) are longer than some copies and shorter than others.
        for k in 0..100u32 {
            map.insert(k, vec![u64::from(k); 40 + k as usize % 50]);
            plain.insert(k, vec![u64::from(k); 40 + k as usize % 50]);
        }
        let (shared, plain_shared) = (map.share(), plain.share());
        for k in 0..100u32 {
            map.get_mut(&k)
                .expect("entry")
                .resize(64 + k as usize % 9, 7);
            plain
                .get_mut(&k)
                .expect("entry")
                .resize(64 + k as usize % 9, 7);
        }
        drop((shared, plain_shared));
        map.settle(usize::MAX);
        plain.settle(usize::MAX);
        assert_eq!(map.spare.len(), 100, "the replaced entries are kept");
        assert!(plain.spare.is_empty(), "a map without spares keeps none");
        let buffers: std::collections::HashSet<usize> =
            map.spare.iter().map(|v| v.as_ptr() as usize).collect();
        let shared = map.share();
        let mut reused = 0;
        for k in 0..100u32 {
            let copy = map.get_mut(&k).expect("entry");
            assert_eq!(Some(&*copy), shared.get(&k), "the copy of {k}");
            reused += usize::from(buffers.contains(&(copy.as_ptr() as usize)));
            copy.push(1);
        }
        assert!(reused > 0, "copies went into spares' buffers");
        assert_eq!(
            shared.get(&3).map(Vec::len),
            Some(67),
            "the reader's is untouched"
        );
        drop(shared);
        map.settle(usize::MAX);
        for k in 0..10 {
            map.remove(&k);
        }
        assert_eq!(map.len(), 90);
        assert!(map.spare.len() <= map.len());
        map.retain(|v| v[0] % 2 == 0);
        assert_eq!(map.len(), 45);
        assert!(map.spare.len() <= map.len());
        map.clear();
        assert!(map.spare.is_empty());
    }

    /// Sharing is a reference count, whatever the size; changes made while shared wait in
    /// front and are folded in a few at a time once the reader lets go.
    #[test]
    fn sharing_waits_changes_and_folds_them_in_steps() {
        let mut map: Layered<u32, u32> = Layered::default();
        for k in 0..1_000 {
            map.insert(k, k);
        }
        let shared = map.share();
        for k in 0..100 {
            *map.get_mut(&k).expect("entry") += 1;
        }
        map.insert(5_000, 0);
        assert_eq!(map.unsettled(), 101);
        assert_eq!(map.settle(40), 101, "the reader still holds the map");
        assert_eq!(shared.get(&0), Some(&0));
        assert_eq!(map.get(&0), Some(&1));
        drop(shared);
        assert_eq!(map.settle(40), 61);
        assert_eq!(map.settle(40), 21);
        assert_eq!(map.settle(40), 0);
        assert_eq!(map.len(), 1_001);
        assert_eq!(map.get(&99), Some(&100));
    }
}

//! A map a checkpoint can take whole at once while the query goes on changing it.
//!
//! [`Layered::share`] hands out the map as it is (one reference count, whatever its size);
//! until every holder has let it go, changes land in a second map in front of it, each entry
//! copied there the first time it changes. Once the shared map is back in sole hands, the
//! changes are folded into it a few at a time ([`Layered::settle`]), so that no single
//! micro-batch pays for every change made while a checkpoint was read out.

use std::borrow::Borrow;
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
    len: usize,
}

impl<K, V> Default for Layered<K, V> {
    fn default() -> Self {
        Self {
            base: Arc::default(),
            changes: HashMap::new(),
            len: 0,
        }
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
            self.changes.insert(k.clone(), Some(v.clone()));
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
        }
        previous
    }

    /// The entry of `key`, set to `make()` first when it has none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if !self.contains_key(&key) {
            return self.insert(key, make());
        }
        if !self.changes.contains_key(&key) && Arc::get_mut(&mut self.base).is_none() {
            let copy = self.base.get(&key).cloned();
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
            return;
        }
        let dropped: Vec<K> = self
            .iter()
            .filter(|(_, v)| !keep(v))
            .map(|(k, _)| k.clone())
            .collect();
        self.len -= dropped.len();
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
        let Some(base) = Arc::get_mut(&mut self.base) else {
            return self.changes.len();
        };
        if n >= self.changes.len() {
            fold(base, self.changes.drain());
        } else {
            let keys: Vec<K> = self.changes.keys().take(n).cloned().collect();
            let taken: Vec<(K, Option<V>)> = keys
                .into_iter()
                .filter_map(|k| self.changes.remove_entry(&k))
                .collect();
            fold(base, taken);
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
            fold(Arc::make_mut(&mut self.base), changes);
        }
        Arc::clone(&self.base)
    }
}

fn fold<K: Eq + Hash, V>(
    base: &mut HashMap<K, V>,
    changes: impl IntoIterator<Item = (K, Option<V>)>,
) {
    for (k, v) in changes {
        match v {
            Some(v) => {
                base.insert(k, v);
            }
            None => {
                base.remove(&k);
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

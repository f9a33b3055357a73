//! From scores to alerts: hysteresis, minimum duration, cooldown, expiry, emit-on-change.

use serde::{Deserialize, Serialize};

/// How scores become alerts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AlertRule {
    /// An alert is raised when the score stays at or above this…
    pub raise: f64,
    /// …and cleared when it falls to or below this (below `raise`: hysteresis).
    pub clear: f64,
    /// …for at least this long (event time) before it is raised; 0 raises on the first score.
    pub min_duration_ms: i64,
    /// After a clear, no new alert for this long.
    pub cooldown_ms: i64,
    /// An active alert with no score for this long is cleared (its entity went quiet).
    pub expire_ms: Option<i64>,
}

impl AlertRule {
    /// Severity 2 (minor) to 5 (critical) from how far the score is past `raise`: below 1.5 ×
    /// raise 2, below 2 × 3, below 3 × 4, else 5.
    pub fn severity(&self, score: f64) -> i32 {
        let ratio = if self.raise > 0.0 {
            score / self.raise
        } else {
            1.0 + (score - self.raise).max(0.0)
        };
        match ratio {
            r if r < 1.5 => 2,
            r if r < 2.0 => 3,
            r if r < 3.0 => 4,
            _ => 5,
        }
    }
}

/// What an alert did on a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertTransition {
    /// Raised on this row.
    Raised,
    /// Still active, and its severity changed.
    Updated,
    /// Cleared on this row.
    Cleared,
}

impl AlertTransition {
    /// `RAISED`, `UPDATED` or `CLEARED`, as in the alerts topic.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertTransition::Raised => "RAISED",
            AlertTransition::Updated => "UPDATED",
            AlertTransition::Cleared => "CLEARED",
        }
    }
}

/// The alert machine's answer for one row.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AlertOut {
    /// The transition on this row; `None` when nothing changed (emit-on-change: filter on it).
    pub state: Option<AlertTransition>,
    /// Whether the alert is active after this row.
    pub active: bool,
    /// Event time the active (or just cleared) alert's condition began.
    pub started_at: Option<i64>,
    /// Highest score of the active (or just cleared) alert.
    pub peak: Option<f64>,
    /// Severity 2–5 of the active alert, from the current score.
    pub severity: Option<i32>,
}

/// One key's alert: inactive → pending (score ≥ raise, waiting for the minimum duration) →
/// RAISED → UPDATED on each severity change → CLEARED when the score falls to `clear`, or when
/// no score has come for the expiry time. A score between `clear` and `raise` changes nothing,
/// so the alert does not flap; a new alert waits out the cooldown after a clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertMachine {
    rule: AlertRule,
    active: bool,
    pending_since: Option<i64>,
    started_at: Option<i64>,
    cleared_at: Option<i64>,
    last_t: Option<i64>,
    peak: f64,
    severity: i32,
}

impl AlertMachine {
    /// An inactive alert under `rule`.
    pub fn new(rule: AlertRule) -> Self {
        Self {
            rule,
            active: false,
            pending_since: None,
            started_at: None,
            cleared_at: None,
            last_t: None,
            peak: f64::NEG_INFINITY,
            severity: 0,
        }
    }

    fn out(&self, state: Option<AlertTransition>) -> AlertOut {
        let shown = self.active || state == Some(AlertTransition::Cleared);
        AlertOut {
            state,
            active: self.active,
            started_at: if shown { self.started_at } else { None },
            peak: if shown { Some(self.peak) } else { None },
            severity: if self.active || state.is_some() {
                Some(self.severity)
            } else {
                None
            },
        }
    }

    /// Feeds the score at `t_ms` (`None`: no score, nothing changes).
    pub fn update(&mut self, t_ms: i64, score: Option<f64>) -> AlertOut {
        let Some(score) = score.filter(|s| s.is_finite()) else {
            return self.out(None);
        };
        self.last_t = Some(self.last_t.map_or(t_ms, |l| l.max(t_ms)));
        let rule = self.rule;
        if self.active {
            if score <= rule.clear {
                self.active = false;
                self.cleared_at = Some(t_ms);
                self.pending_since = None;
                return self.out(Some(AlertTransition::Cleared));
            }
            self.peak = self.peak.max(score);
            let severity = rule.severity(score);
            if severity != self.severity && score >= rule.raise {
                self.severity = severity;
                return self.out(Some(AlertTransition::Updated));
            }
            return self.out(None);
        }
        if score < rule.raise {
            self.pending_since = None;
            return self.out(None);
        }
        let since = *self.pending_since.get_or_insert(t_ms);
        if self.pending_since == Some(t_ms) {
            self.peak = score;
        } else {
            self.peak = self.peak.max(score);
        }
        let cooled = self
            .cleared_at
            .is_none_or(|c| t_ms >= c.saturating_add(rule.cooldown_ms));
        if t_ms - since >= rule.min_duration_ms && cooled {
            self.active = true;
            self.started_at = Some(since);
            self.severity = rule.severity(score);
            return self.out(Some(AlertTransition::Raised));
        }
        self.out(None)
    }

    /// When an active alert expires for want of scores.
    pub fn due(&self) -> Option<i64> {
        match (self.active, self.rule.expire_ms, self.last_t) {
            (true, Some(expire), Some(last)) => Some(last.saturating_add(expire)),
            _ => None,
        }
    }

    /// Whether an alert is raised: state a consumer waits to see cleared. One still pending
    /// (waiting out its minimum duration) is not: nothing was published for it, and a key
    /// silent long enough to be dropped starts it again on its next score.
    pub fn is_open(&self) -> bool {
        self.active
    }

    /// Clears an active alert once the watermark has passed [`AlertMachine::due`].
    pub fn fire(&mut self, watermark: i64) -> Option<AlertOut> {
        let due = self.due()?;
        if watermark <= due {
            return None;
        }
        self.active = false;
        self.cleared_at = Some(due);
        self.pending_since = None;
        Some(self.out(Some(AlertTransition::Cleared)))
    }
}

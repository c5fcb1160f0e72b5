//! Overrun tracking with hysteresis, per branch.
//!
//! An observation is *over* when the body's duration or its start delay exceeds 1.5x the
//! interval, or when the pass failed (a branch whose passes all time out is not on time just
//! because none overran); *under* when it succeeded and both are below 0.7x; anything in
//! between changes nothing. Three
//! consecutive overs turn an on-time branch delayed (one episode, counted once); three
//! consecutive unders recover it. Start delay is what makes a branch starved by a sibling
//! visible: its own body may be fast while it starts late.

use std::time::Duration;

pub const OVER_FACTOR: f64 = 1.5;
pub const UNDER_FACTOR: f64 = 0.7;
pub const STREAK: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverrunState {
    OnTime,
    Delayed,
}

impl OverrunState {
    pub fn as_str(self) -> &'static str {
        match self {
            OverrunState::OnTime => "on_time",
            OverrunState::Delayed => "delayed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// A new overrun episode began.
    BecameDelayed,
    Recovered,
}

#[derive(Debug, Clone)]
pub struct OverrunTracker {
    state: OverrunState,
    over_streak: u32,
    under_streak: u32,
    episodes: u64,
    failures_in_a_row: u32,
}

impl Default for OverrunTracker {
    fn default() -> Self {
        Self {
            state: OverrunState::OnTime,
            over_streak: 0,
            under_streak: 0,
            episodes: 0,
            failures_in_a_row: 0,
        }
    }
}

impl OverrunTracker {
    pub fn observe(
        &mut self,
        duration: Duration,
        start_delay: Duration,
        interval: Duration,
        failed: bool,
    ) -> Transition {
        let limit = interval.as_secs_f64();
        let worst = duration.as_secs_f64().max(start_delay.as_secs_f64());
        self.failures_in_a_row = if failed {
            self.failures_in_a_row + 1
        } else {
            0
        };
        if failed || worst > OVER_FACTOR * limit {
            self.over_streak += 1;
            self.under_streak = 0;
        } else if worst < UNDER_FACTOR * limit {
            self.under_streak += 1;
            self.over_streak = 0;
        }
        match self.state {
            OverrunState::OnTime if self.over_streak >= STREAK => {
                self.state = OverrunState::Delayed;
                self.episodes += 1;
                self.over_streak = 0;
                Transition::BecameDelayed
            }
            OverrunState::Delayed if self.under_streak >= STREAK => {
                self.state = OverrunState::OnTime;
                self.under_streak = 0;
                Transition::Recovered
            }
            _ => Transition::None,
        }
    }

    pub fn state(&self) -> OverrunState {
        self.state
    }

    pub fn episodes(&self) -> u64 {
        self.episodes
    }

    /// Passes in a row that failed (timed out, errored or panicked), up to the last one.
    pub fn failures_in_a_row(&self) -> u32 {
        self.failures_in_a_row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_millis(100);
    const FAST: Duration = Duration::from_millis(10);
    const SLOW: Duration = Duration::from_millis(200);
    const MIDDLE: Duration = Duration::from_millis(100);

    #[test]
    fn three_overs_start_one_episode_and_three_unders_recover() {
        let mut t = OverrunTracker::default();
        assert_eq!(t.observe(SLOW, FAST, I, false), Transition::None);
        assert_eq!(t.observe(SLOW, FAST, I, false), Transition::None);
        assert_eq!(t.observe(SLOW, FAST, I, false), Transition::BecameDelayed);
        // Still slow: the same episode, not counted again.
        for _ in 0..10 {
            assert_eq!(t.observe(SLOW, FAST, I, false), Transition::None);
        }
        assert_eq!((t.state(), t.episodes()), (OverrunState::Delayed, 1));
        assert_eq!(t.observe(FAST, FAST, I, false), Transition::None);
        assert_eq!(t.observe(FAST, FAST, I, false), Transition::None);
        assert_eq!(t.observe(FAST, FAST, I, false), Transition::Recovered);
        assert_eq!(t.state(), OverrunState::OnTime);
    }

    #[test]
    fn start_delay_alone_makes_a_starved_branch_delayed() {
        let mut t = OverrunTracker::default();
        for _ in 0..3 {
            t.observe(FAST, SLOW, I, false);
        }
        assert_eq!(t.state(), OverrunState::Delayed);
    }

    #[test]
    fn in_between_observations_neither_count_nor_reset() {
        let mut t = OverrunTracker::default();
        t.observe(SLOW, FAST, I, false);
        t.observe(MIDDLE, FAST, I, false);
        t.observe(SLOW, FAST, I, false);
        assert_eq!(t.observe(SLOW, FAST, I, false), Transition::BecameDelayed);
        // A fast observation breaks an over streak.
        let mut t = OverrunTracker::default();
        t.observe(SLOW, FAST, I, false);
        t.observe(SLOW, FAST, I, false);
        t.observe(FAST, FAST, I, false);
        assert_eq!(t.observe(SLOW, FAST, I, false), Transition::None);
        assert_eq!(t.state(), OverrunState::OnTime);
    }

    #[test]
    fn failed_passes_count_as_over_however_fast_they_were() {
        let mut t = OverrunTracker::default();
        assert_eq!(t.observe(FAST, FAST, I, true), Transition::None);
        assert_eq!(t.observe(FAST, FAST, I, true), Transition::None);
        assert_eq!(t.observe(FAST, FAST, I, true), Transition::BecameDelayed);
        assert_eq!(t.failures_in_a_row(), 3);
        for _ in 0..2 {
            t.observe(FAST, FAST, I, false);
        }
        assert_eq!(t.failures_in_a_row(), 0);
        assert_eq!(t.observe(FAST, FAST, I, false), Transition::Recovered);
    }

    #[test]
    fn a_second_episode_is_counted_again() {
        let mut t = OverrunTracker::default();
        for _ in 0..3 {
            t.observe(SLOW, FAST, I, false);
        }
        for _ in 0..3 {
            t.observe(FAST, FAST, I, false);
        }
        for _ in 0..3 {
            t.observe(SLOW, FAST, I, false);
        }
        assert_eq!(t.episodes(), 2);
    }
}

//! Adaptive concurrency: how many attempts one webhook gets at once, between
//! 1 and its `max_in_flight`, learnt from its answers.
//!
//! A [`Controller`] per webhook is fed every answer (its round-trip time and
//! a [`Signal`]) and the moments its limit was fully used, and moves the
//! limit as TCP congestion control moves a window, after Vector's adaptive
//! request concurrency:
//!
//! - Time is cut into *cycles* of one baseline round trip. At the end of a
//!   cycle in which the limit was reached, with no back pressure and no
//!   latency rise, the limit grows: doubling while in *slow start* (from
//!   [`INITIAL`], so a 250 ms receiver with 32 busy chains gets 32 requests
//!   at once after two round trips), then by one per cycle (additive increase).
//! - Back pressure (429, 5xx, a timeout or a failed connection) cuts the
//!   limit at once, to half in slow start (which overshoots by up to twice)
//!   and by [`DECREASE`] after (multiplicative decrease); at most once per
//!   cycle, since the answers to requests sent before the cut say nothing
//!   about the new limit.
//! - A *latency rise* cuts it too: the cycle's mean round trip against the
//!   baseline, an exponentially weighted moving average ([`EWMA_ALPHA`]) of
//!   past cycles' means, past the larger of [`DEVIATION_SCALE`] times the
//!   average deviation and [`MIN_RISE`] of the baseline. A receiver that
//!   queues requests answers later as it gets more of them: the rise says
//!   so before it fails.
//! - Where back pressure came (the *ceiling*), the limit does not go again
//!   until `probe_wait` clean cycles have passed, and each probe that meets
//!   back pressure again doubles that wait (up to [`PROBE_WAIT_MAX`]): a
//!   receiver that refuses its ninth request settles at eight and is asked
//!   for a ninth less and less often, instead of every other cycle. A probe
//!   that holds for a cycle lifts the ceiling.
//!
//! Pure: no clock, no I/O. Times are `Duration`s since any origin the caller
//! keeps, so every rule is tested with scripted answers.

use std::time::Duration;

/// The limit a webhook starts with (or its `max_in_flight` if lower): TCP's
/// initial window (RFC 6928), more than v1's fixed 4 so a slow receiver with
/// many busy chains is reached in two round trips, few enough that a
/// receiver that refuses past a handful sees a few refusals once.
pub const INITIAL: usize = 10;
/// The multiplicative decrease after slow start.
pub const DECREASE: f64 = 0.9;
/// Weight of the newest cycle in the round-trip baseline and its deviation.
pub const EWMA_ALPHA: f64 = 0.4;
/// A cycle's mean round trip past the baseline by more than this many
/// average deviations is a latency rise.
pub const DEVIATION_SCALE: f64 = 2.5;
/// ... and by at least this share of the baseline: a receiver whose answers
/// hardly vary has a deviation near zero, and scheduling noise on a busy
/// host must not read as a rise.
pub const MIN_RISE: f64 = 0.2;
/// The most clean cycles waited before probing a ceiling again.
pub const PROBE_WAIT_MAX: u32 = 32;
/// Bounds of a cycle: a receiver answering in microseconds does not make a
/// decision per answer, and one answering in minutes still gets one a minute.
const CYCLE_MIN: Duration = Duration::from_millis(10);
const CYCLE_MAX: Duration = Duration::from_secs(60);

/// What one answer says about the receiver's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A 2xx: its round trip is a sample of the receiver's latency.
    Success,
    /// 429, 5xx, a timeout or a failed connection: too much.
    BackPressure,
    /// Any other answer (a 4xx, a body that could not be rendered): says
    /// nothing about load.
    Neutral,
}

/// One webhook's concurrency limit and what it has learnt.
#[derive(Debug, Clone)]
pub struct Controller {
    max: usize,
    limit: usize,
    slow_start: bool,
    /// Round-trip baseline and its average deviation (seconds).
    baseline: Option<f64>,
    deviation: f64,
    /// The cycle under way: when it began, its successful round trips, and
    /// whether the limit was reached during it.
    cycle_start: Duration,
    rtt_sum: f64,
    rtt_count: u32,
    reached: bool,
    /// The limit when the cycle began: a probe holds only if a whole cycle
    /// ran at the probed limit.
    start_limit: usize,
    last_cut: Option<Duration>,
    /// The limit at which back pressure came last, while it holds.
    ceiling: Option<usize>,
    clean_cycles: u32,
    probe_wait: u32,
}

impl Controller {
    /// A controller at [`INITIAL`] (or `max` if lower), in slow start.
    pub fn new(max: usize, now: Duration) -> Controller {
        let max = max.max(1);
        Controller {
            max,
            limit: INITIAL.min(max),
            slow_start: true,
            baseline: None,
            deviation: 0.0,
            cycle_start: now,
            rtt_sum: 0.0,
            rtt_count: 0,
            reached: false,
            start_limit: INITIAL.min(max),
            last_cut: None,
            ceiling: None,
            clean_cycles: 0,
            probe_wait: 2,
        }
    }

    /// How many attempts may be in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The upper bound changed (a reload): the limit stays within it.
    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
        self.limit = self.limit.min(self.max);
    }

    /// The deliverer started an attempt that filled the limit: the cycle
    /// used all it was given, so growing is justified.
    pub fn reached_limit(&mut self) {
        self.reached = true;
    }

    /// The baseline round trip, if any answer has set one.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.map(Duration::from_secs_f64)
    }

    fn cycle_len(&self, rtt: Duration) -> Duration {
        self.baseline.map_or(rtt, Duration::from_secs_f64).clamp(CYCLE_MIN, CYCLE_MAX)
    }

    /// One answer, `rtt` after its request started, at `now`. Returns
    /// whether the limit changed.
    pub fn answered(&mut self, now: Duration, rtt: Duration, signal: Signal) -> bool {
        let before = self.limit;
        let cycle = self.cycle_len(rtt);
        match signal {
            Signal::BackPressure => {
                if self.last_cut.is_none_or(|at| now.saturating_sub(at) >= cycle) {
                    self.cut(now);
                }
                return self.limit != before;
            }
            Signal::Success => {
                self.rtt_sum += rtt.as_secs_f64();
                self.rtt_count += 1;
            }
            Signal::Neutral => {}
        }
        if now.saturating_sub(self.cycle_start) >= cycle {
            self.end_cycle(now);
        }
        self.limit != before
    }

    fn restart_cycle(&mut self, now: Duration) {
        self.cycle_start = now;
        self.rtt_sum = 0.0;
        self.rtt_count = 0;
        self.reached = false;
        self.start_limit = self.limit;
    }

    fn cut(&mut self, now: Duration) {
        let before = self.limit;
        let cut = if self.slow_start { before / 2 } else { (before as f64 * DECREASE) as usize };
        self.limit = cut.min(before.saturating_sub(1)).max(1);
        self.slow_start = false;
        if self.ceiling == Some(before) {
            // A probe of the same ceiling failed again: wait longer next time.
            self.probe_wait = self.probe_wait.saturating_mul(2).min(PROBE_WAIT_MAX);
        }
        self.ceiling = Some(before);
        self.clean_cycles = 0;
        self.last_cut = Some(now);
        self.restart_cycle(now);
    }

    fn end_cycle(&mut self, now: Duration) {
        if self.rtt_count == 0 {
            self.restart_cycle(now);
            return;
        }
        let mean = self.rtt_sum / f64::from(self.rtt_count);
        let rose = self.baseline.is_some_and(|b| mean > b + (DEVIATION_SCALE * self.deviation).max(MIN_RISE * b));
        let cut_recently =
            self.last_cut.is_some_and(|at| now.saturating_sub(at) < self.cycle_len(Duration::from_secs_f64(mean)));
        let reached = self.reached;
        self.baseline = Some(match self.baseline {
            None => mean,
            Some(b) => {
                self.deviation = self.deviation * (1.0 - EWMA_ALPHA) + (mean - b).abs() * EWMA_ALPHA;
                b * (1.0 - EWMA_ALPHA) + mean * EWMA_ALPHA
            }
        });
        if rose {
            if !cut_recently {
                self.cut(now);
            }
            return;
        }
        if reached {
            // A whole cycle at or above the ceiling without back pressure:
            // the receiver takes more now.
            if self.ceiling.is_some_and(|c| self.start_limit >= c) {
                self.ceiling = None;
                self.probe_wait = 2;
            }
            self.grow();
        }
        self.restart_cycle(now);
    }

    fn grow(&mut self) {
        if self.limit >= self.max {
            return;
        }
        let mut target = if self.slow_start { self.limit * 2 } else { self.limit + 1 }.min(self.max);
        if let Some(ceiling) = self.ceiling.filter(|&c| target >= c) {
            self.clean_cycles += 1;
            target = if self.clean_cycles >= self.probe_wait {
                self.clean_cycles = 0;
                ceiling
            } else {
                target.min(ceiling - 1)
            };
        }
        self.limit = target.max(self.limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Drives a controller against a model receiver for `cycles` round
    /// trips: each round trip, `min(limit, chains)` requests go out and are
    /// answered by `answer(n_open)`. Returns the limits seen and the
    /// answers that were back pressure.
    fn drive(
        c: &mut Controller,
        chains: usize,
        cycles: usize,
        answer: impl Fn(usize, usize) -> (Signal, Duration),
    ) -> (Vec<usize>, usize, usize) {
        let mut now = Duration::ZERO;
        let mut limits = Vec::new();
        let (mut refused, mut total) = (0, 0);
        for _ in 0..cycles {
            let open = c.limit().min(chains);
            if open >= c.limit() {
                c.reached_limit();
            }
            let mut answers: Vec<(Signal, Duration)> = (0..open).map(|i| answer(open, i)).collect();
            answers.sort_by_key(|a| a.1);
            let longest = answers.iter().map(|a| a.1).max().unwrap_or(MS(1));
            for (i, (signal, rtt)) in answers.into_iter().enumerate() {
                total += 1;
                refused += usize::from(signal == Signal::BackPressure);
                c.answered(now + rtt + MS(i as u64 % 2), rtt, signal);
            }
            now += longest + MS(1);
            limits.push(c.limit());
        }
        (limits, refused, total)
    }

    #[test]
    fn slow_start_reaches_every_busy_chain_within_a_few_round_trips() {
        let mut c = Controller::new(64, Duration::ZERO);
        let (limits, refused, _) = drive(&mut c, 32, 8, |_, _| (Signal::Success, MS(250)));
        assert_eq!(refused, 0);
        assert!(limits[..4].contains(&32) || limits[..4].iter().any(|&l| l >= 32), "{limits:?}");
        assert!(limits.iter().all(|&l| l <= 64));
    }

    #[test]
    fn the_limit_never_leaves_its_bounds() {
        let mut c = Controller::new(3, Duration::ZERO);
        let (limits, _, _) = drive(&mut c, 100, 20, |_, _| (Signal::Success, MS(5)));
        assert_eq!(*limits.last().unwrap(), 3);
        let mut c = Controller::new(64, Duration::ZERO);
        let (limits, _, _) = drive(&mut c, 100, 50, |_, _| (Signal::BackPressure, MS(5)));
        assert!(limits.iter().all(|&l| l >= 1));
        assert_eq!(*limits.last().unwrap(), 1);
        c.set_max(0);
        assert_eq!(c.limit(), 1, "a zero max still allows one");
    }

    /// The receiver of acceptance test 2: more than 8 open is refused.
    #[test]
    fn a_receiver_that_refuses_past_eight_settles_at_eight() {
        let mut c = Controller::new(64, Duration::ZERO);
        let refuse_past_8 = |open: usize, i: usize| {
            if open > 8 && i >= 8 { (Signal::BackPressure, MS(1)) } else { (Signal::Success, MS(100)) }
        };
        let (limits, _, _) = drive(&mut c, 32, 40, refuse_past_8);
        let (later, refused, total) = drive(&mut c, 32, 200, refuse_past_8);
        assert!(later.iter().filter(|&&l| l <= 8).count() * 10 >= later.len() * 9, "{limits:?} {later:?}");
        assert!(later.iter().rev().take(50).any(|&l| l == 8), "uses what it may: {later:?}");
        assert!(refused * 100 < total * 2, "{refused} of {total} refused once adapted");
    }

    /// A receiver that queues: its answers take 50 ms per open request.
    /// The rise in latency stops the growth near where it began.
    #[test]
    fn a_latency_rise_cuts_the_limit() {
        let mut c = Controller::new(64, Duration::ZERO);
        let (_, _, _) = drive(&mut c, 64, 10, |_, _| (Signal::Success, MS(100)));
        assert!(c.limit() >= 32);
        let before = c.limit();
        let (limits, _, _) = drive(&mut c, 64, 3, |open, _| (Signal::Success, MS(100 + 50 * open as u64)));
        assert!(limits.iter().any(|&l| l < before), "{before} then {limits:?}");
    }

    #[test]
    fn steady_latency_with_noise_does_not_cut() {
        let mut c = Controller::new(64, Duration::ZERO);
        let (limits, _, _) = drive(&mut c, 40, 60, |_, i| (Signal::Success, MS(250 + (i as u64 * 7) % 30)));
        let settled = &limits[10..];
        assert!(settled.iter().all(|&l| l >= 40), "{limits:?}");
    }

    #[test]
    fn back_pressure_cuts_once_per_cycle() {
        let mut c = Controller::new(64, Duration::ZERO);
        drive(&mut c, 64, 10, |_, _| (Signal::Success, MS(100)));
        let before = c.limit();
        let now = MS(100_000);
        c.answered(now, MS(100), Signal::BackPressure);
        let once = c.limit();
        assert!(once < before);
        for i in 0..20 {
            c.answered(now + MS(i), MS(100), Signal::BackPressure);
        }
        assert_eq!(c.limit(), once, "the answers to requests sent before the cut do not cut again");
        c.answered(now + MS(200), MS(100), Signal::BackPressure);
        assert!(c.limit() < once, "a cycle later, back pressure cuts again");
    }

    #[test]
    fn neutral_answers_change_nothing() {
        let mut c = Controller::new(64, Duration::ZERO);
        for i in 0..100 {
            c.reached_limit();
            assert!(!c.answered(MS(i * 300), MS(200), Signal::Neutral));
        }
        assert_eq!(c.limit(), INITIAL);
    }
}

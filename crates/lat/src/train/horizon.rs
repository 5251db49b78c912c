//! How long the learning-rate schedule is. Without a time limit it spans `max_steps`. With one,
//! the schedule ends when the time does: after warm-up the steps that the time left allows are
//! estimated from the measured time per step since warm-up (evaluations, samples and
//! checkpoints included, as they recur), re-estimated after every step, keeping back what the
//! end of the run takes (the evaluation of the whole validation split and the last save);
//! `max_steps` wins whenever it is the tighter bound. The horizon is saved in checkpoints, so a
//! resumed run goes on with the schedule it had.

use serde::{Deserialize, Serialize};

/// Which bound sets the length of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// `max_steps`.
    MaxSteps,
    /// The time limit, through the measured time per step.
    TimeLimit,
}

impl Bound {
    /// The setting's name, as in logs.
    pub fn name(self) -> &'static str {
        match self {
            Bound::MaxSteps => "max_steps",
            Bound::TimeLimit => "time_limit",
        }
    }
}

/// The schedule's length and what it is estimated from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Horizon {
    /// Steps the schedule spans: the learning rate reaches `min_lr` there.
    pub total: u64,
    /// Which bound set `total`.
    pub bound: Bound,
    /// The step and the run's elapsed seconds when warm-up ended: the rate is measured from
    /// there, past the first steps' start-up costs.
    pub since: Option<(u64, f64)>,
    /// Seconds kept back for the end of the run (final evaluation and save).
    pub reserve_s: f64,
}

impl Horizon {
    /// The schedule over `max_steps`, before anything is measured.
    pub fn new(max_steps: u64) -> Self {
        Self { total: max_steps, bound: Bound::MaxSteps, since: None, reserve_s: 0.0 }
    }

    /// Mean seconds per step since warm-up ended, at `step` and `elapsed` seconds into the run.
    pub fn seconds_per_step(&self, step: u64, elapsed: f64) -> Option<f64> {
        let (s0, e0) = self.since?;
        (step > s0).then(|| (elapsed - e0) / (step - s0) as f64)
    }

    /// Re-estimates after `step` steps, `elapsed` seconds into a run limited to `limit` seconds
    /// (None: no limit) and `max_steps` steps, whose warm-up is `warmup` steps.
    pub fn observe(&mut self, step: u64, elapsed: f64, limit: Option<f64>, max_steps: u64, warmup: u64) {
        if self.since.is_none() && step >= warmup.max(1) {
            self.since = Some((step, elapsed));
        }
        self.total = max_steps;
        self.bound = Bound::MaxSteps;
        let (Some(limit), Some(per)) = (limit, self.seconds_per_step(step, elapsed)) else { return };
        let left = (limit - self.reserve_s - elapsed).max(0.0);
        let by_time = step + (left / per.max(1e-9)) as u64;
        if by_time < max_steps {
            self.total = by_time.max(step);
            self.bound = Bound::TimeLimit;
        }
    }

    /// Whether another step would run into the time kept back for the end of the run.
    pub fn out_of_time(&self, step: u64, elapsed: f64, limit: Option<f64>) -> bool {
        let next = self.seconds_per_step(step, elapsed).unwrap_or(0.0);
        limit.is_some_and(|l| elapsed + next + self.reserve_s > l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::schedule;

    /// A simulated run: steps of `step_s` seconds, an evaluation of `eval_s` every 50 steps;
    /// returns the learning rate of every step and the horizon at the end.
    fn simulate(horizon: &mut Horizon, from: (u64, f64), until: Option<u64>, limit: f64, max_steps: u64, step_s: f64, eval_s: f64) -> (Vec<f64>, u64, f64) {
        let (warmup, (lr, min_lr)) = (20, (1e-3, 1e-5));
        let (mut step, mut clock) = from;
        let mut lrs = vec![];
        while step < max_steps && !horizon.out_of_time(step, clock, Some(limit)) && until.is_none_or(|u| step < u) {
            lrs.push(schedule(step, lr, min_lr, warmup, horizon.total));
            step += 1;
            clock += step_s + if step % 50 == 0 { eval_s } else { 0.0 };
            horizon.observe(step, clock, Some(limit), max_steps, warmup);
        }
        (lrs, step, clock)
    }

    #[test]
    fn a_binding_time_limit_ends_the_schedule_at_min_lr() {
        let mut h = Horizon::new(100_000);
        h.reserve_s = 5.0;
        let (lrs, step, clock) = simulate(&mut h, (0, 0.0), None, 100.0, 100_000, 0.1, 0.4);
        assert_eq!(h.bound, Bound::TimeLimit);
        // 95 s for steps of 0.108 s on average.
        assert!((step as f64 - 95.0 / 0.108).abs() < 3.0, "{step} steps");
        assert!(clock + h.reserve_s > 99.0 && clock + h.reserve_s <= 100.5, "ended at {clock}");
        let last = *lrs.last().unwrap();
        assert!(last < 1e-5 + 1e-3 * 1e-4, "the last step's lr {last} is min_lr");
        // It decays the whole way: half-way through time, about half-way down.
        let mid = lrs[lrs.len() / 2];
        assert!((mid - 0.5e-3).abs() < 0.05e-3, "mid-run lr {mid}");
    }

    #[test]
    fn max_steps_wins_when_it_is_the_tighter_bound() {
        let mut h = Horizon::new(500);
        let (lrs, step, _) = simulate(&mut h, (0, 0.0), None, 100.0, 500, 0.01, 0.1);
        assert_eq!((h.bound, h.total, step), (Bound::MaxSteps, 500, 500));
        assert!(lrs.iter().zip(0..).all(|(&lr, s)| lr == schedule(s, 1e-3, 1e-5, 20, 500)), "the max_steps schedule exactly");
    }

    #[test]
    fn a_resumed_run_goes_on_with_the_schedule_it_had() {
        let (limit, max_steps) = (60.0, 100_000);
        let mut whole = Horizon::new(max_steps);
        let (all, end, _) = simulate(&mut whole, (0, 0.0), None, limit, max_steps, 0.05, 0.3);
        let mut first = Horizon::new(max_steps);
        let (mut lrs, step, clock) = simulate(&mut first, (0, 0.0), Some(400), limit, max_steps, 0.05, 0.3);
        // What a checkpoint keeps, read back.
        let mut resumed: Horizon = serde_json::from_str(&serde_json::to_string(&first).unwrap()).unwrap();
        assert_eq!(resumed, first);
        let (rest, resumed_end, _) = simulate(&mut resumed, (step, clock), None, limit, max_steps, 0.05, 0.3);
        lrs.extend(rest);
        assert_eq!((lrs, resumed_end), (all, end));
    }
}

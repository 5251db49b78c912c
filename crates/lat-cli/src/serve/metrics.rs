//! The server's metrics, rendered in the Prometheus text format at `GET /metrics`.

use std::fmt::Write;

/// Request outcomes, as the `outcome` label of `lat_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed (every choice finished by length or a stop string).
    Ok,
    /// Refused with 400.
    BadRequest,
    /// Refused with 429: the queue was full.
    Rejected,
    /// The client went away before the end.
    Cancelled,
    /// Failed inside the server.
    Error,
}

const OUTCOMES: [(Outcome, &str); 5] = [(Outcome::Ok, "ok"), (Outcome::BadRequest, "bad_request"), (Outcome::Rejected, "rejected"), (Outcome::Cancelled, "cancelled"), (Outcome::Error, "error")];

/// A histogram with fixed upper bounds.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram").ok();
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}").ok();
        }
        writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", self.count, self.sum, self.count).ok();
    }
}

const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Everything `/metrics` reports.
#[derive(Clone, Debug)]
pub struct Metrics {
    requests: [u64; 5],
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub decode_steps: u64,
    /// Streams in the last decoding step.
    pub batch_size: usize,
    pub step_batch: Histogram,
    pub queue_depth: usize,
    pub active_streams: usize,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Bytes of the decoding states held now.
    pub state_bytes: usize,
    /// The most one stream's state can hold.
    pub state_bytes_per_stream: usize,
    pub slots: usize,
    pub queue_capacity: usize,
}

impl Metrics {
    pub fn new(slots: usize, queue_capacity: usize, state_bytes_per_stream: usize) -> Self {
        Self {
            requests: [0; 5],
            prompt_tokens: 0,
            generated_tokens: 0,
            decode_steps: 0,
            batch_size: 0,
            step_batch: Histogram::new(SIZES),
            queue_depth: 0,
            active_streams: 0,
            time_to_first_token: Histogram::new(SECONDS),
            inter_token_latency: Histogram::new(SECONDS),
            state_bytes: 0,
            state_bytes_per_stream,
            slots,
            queue_capacity,
        }
    }

    pub fn request(&mut self, outcome: Outcome) {
        let i = OUTCOMES.iter().position(|(o, _)| *o == outcome).expect("every outcome is listed");
        self.requests[i] += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        writeln!(out, "# HELP lat_requests_total Completion requests by outcome.\n# TYPE lat_requests_total counter").ok();
        for ((_, label), n) in OUTCOMES.iter().zip(&self.requests) {
            writeln!(out, "lat_requests_total{{outcome=\"{label}\"}} {n}").ok();
        }
        let mut scalar = |name: &str, kind: &str, help: &str, v: f64| {
            writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}").ok();
        };
        scalar("lat_prompt_tokens_total", "counter", "Prompt tokens read.", self.prompt_tokens as f64);
        scalar("lat_generated_tokens_total", "counter", "Tokens generated.", self.generated_tokens as f64);
        scalar("lat_decode_steps_total", "counter", "Batched decoding steps.", self.decode_steps as f64);
        scalar("lat_batch_size", "gauge", "Streams in the last decoding step.", self.batch_size as f64);
        scalar("lat_queue_depth", "gauge", "Streams waiting for a slot.", self.queue_depth as f64);
        scalar("lat_queue_capacity", "gauge", "Streams the queue holds before requests get 429.", self.queue_capacity as f64);
        scalar("lat_active_streams", "gauge", "Streams holding a slot.", self.active_streams as f64);
        scalar("lat_slots", "gauge", "Streams decoded together at most.", self.slots as f64);
        scalar("lat_state_bytes", "gauge", "Bytes of the decoding states held now.", self.state_bytes as f64);
        scalar("lat_state_bytes_per_stream", "gauge", "The most bytes one stream's decoding state holds.", self.state_bytes_per_stream as f64);
        self.step_batch.render(&mut out, "lat_step_batch_size", "Streams per decoding step.");
        self.time_to_first_token.render(&mut out, "lat_time_to_first_token_seconds", "From a request's arrival to its first token.");
        self.inter_token_latency.render(&mut out, "lat_inter_token_latency_seconds", "Between consecutive tokens of a stream.");
        out
    }
}

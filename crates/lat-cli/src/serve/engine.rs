//! The decoding loop. One thread owns the model and holds up to `slots` streams; each turn it
//! admits waiting streams into free slots, reads one piece of one new prompt (so that a long
//! prompt never stalls the streams already decoding for more than one piece), and steps every
//! decoding stream together in one batched step: the weights are read once for all of them.
//!
//! A stream reads its prompt and samples exactly as `lat generate` does (the same pieces, the
//! same random stream, and products whose results for a row do not depend on the batch), so its
//! tokens are the ones `lat generate` gives for the same prompt and settings.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use linear_attention_transformer::generate::Sampling;
use linear_attention_transformer::rng::Rng;
use linear_attention_transformer::{DecodeState, Inputs, LinearAttentionTransformerLM, PROMPT_CHUNK};
use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::{Metrics, Outcome};
use super::text::TextStream;
use linear_attention_transformer::text::Codec;

/// What a stream tells its request.
#[derive(Debug)]
pub enum Event {
    /// More text of choice `index`.
    Text { index: usize, text: String },
    /// Choice `index` is over.
    Done { index: usize, finish_reason: &'static str, completion_tokens: usize },
    /// A choice failed.
    Failed { message: String },
}

/// One stream to decode: one choice of one prompt.
pub struct Job {
    /// The choice's index in its request.
    pub index: usize,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Its own random stream (`lat generate` gives row r the stream `derive(seed, r)`).
    pub rng: Rng,
    pub stop: Vec<String>,
    pub eos: Option<u32>,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

/// What the HTTP side and the loop share.
pub struct Shared {
    queue: Mutex<VecDeque<Job>>,
    wake: Condvar,
    queue_capacity: usize,
    pub metrics: Mutex<Metrics>,
    /// Set when the server shuts down: the loop ends once nothing is left.
    pub stopping: AtomicBool,
    /// The model's text codec: prompts are encoded and tokens decoded with it.
    pub codec: Codec,
}

/// The queue had no room.
#[derive(Debug)]
pub struct Full;

impl Shared {
    pub fn new(queue_capacity: usize, metrics: Metrics, codec: Codec) -> Arc<Self> {
        Arc::new(Self { queue: Mutex::new(VecDeque::new()), wake: Condvar::new(), queue_capacity, metrics: Mutex::new(metrics), stopping: AtomicBool::new(false), codec })
    }

    /// Queues every job of a request, or none when they do not all fit.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), Full> {
        let mut queue = self.queue.lock().expect("queue lock");
        if queue.len() + jobs.len() > self.queue_capacity {
            return Err(Full);
        }
        queue.extend(jobs);
        self.metrics.lock().expect("metrics lock").queue_depth = queue.len();
        self.wake.notify_one();
        Ok(())
    }

    pub fn metrics(&self) -> std::sync::MutexGuard<'_, Metrics> {
        self.metrics.lock().expect("metrics lock")
    }
}

/// A stream holding a slot.
struct Stream {
    job: Job,
    state: Option<DecodeState>,
    /// Prompt tokens read so far.
    read: usize,
    /// The token to feed in the next step (sampled, not yet seen by the model).
    next: Option<u32>,
    generated: usize,
    text: TextStream,
    last_token: Instant,
}

impl Stream {
    fn send(&self, event: Event) {
        // A closed channel means the client left; the next turn removes the stream.
        self.job.events.send(event).ok();
    }

    /// Draws the next token from `logits`.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        self.job.sampling.sample(logits, &mut self.job.rng)
    }

    /// Takes the drawn token `t` and sends the text; false once the stream is over.
    fn take(&mut self, t: u32, metrics: &mut Metrics) -> bool {
        let now = Instant::now();
        if self.generated == 0 {
            metrics.time_to_first_token.observe(now.duration_since(self.job.arrived).as_secs_f64());
        } else {
            metrics.inter_token_latency.observe(now.duration_since(self.last_token).as_secs_f64());
        }
        self.last_token = now;
        self.generated += 1;
        metrics.generated_tokens += 1;
        let (mut text, stopped) = self.text.push_token(t);
        let finish = if stopped || self.job.eos == Some(t) {
            Some("stop")
        } else if self.generated == self.job.max_tokens {
            Some("length")
        } else {
            None
        };
        if finish.is_some() && !stopped {
            text.push_str(&self.text.finish());
        }
        if !text.is_empty() {
            self.send(Event::Text { index: self.job.index, text });
        }
        match finish {
            Some(reason) => {
                // The slot is free before the client hears that it is done, so that what the
                // client reads from /metrics next agrees (the turn's end recounts the slots).
                metrics.active_streams = metrics.active_streams.saturating_sub(1);
                self.send(Event::Done { index: self.job.index, finish_reason: reason, completion_tokens: self.generated });
                false
            }
            None => {
                self.next = Some(t);
                true
            }
        }
    }
}

/// Runs the loop until the server stops and nothing is left.
pub fn run(model: LinearAttentionTransformerLM, shared: Arc<Shared>, slots: usize) {
    let mut active: Vec<Stream> = Vec::with_capacity(slots);
    let mut idle = true;
    loop {
        admit(&shared, &mut active, slots);
        if active.is_empty() {
            if shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            if !idle {
                // Idle again: give the finished streams' memory back to the system.
                linear_attention_transformer::allocator::release_free_memory();
                idle = true;
            }
            let queue = shared.queue.lock().expect("queue lock");
            if queue.is_empty() {
                drop(shared.wake.wait_timeout(queue, Duration::from_millis(200)).expect("queue lock"));
            }
            continue;
        }
        idle = false;
        let decoding = active.iter().any(|s| s.next.is_some());
        // One piece of one prompt per turn while others decode; back to back otherwise.
        while let Some(i) = active.iter().position(|s| s.next.is_none() && s.read < s.job.prompt.len()) {
            if let Err(e) = read_piece(&model, &mut active[i], &shared) {
                let s = active.remove(i);
                shared.metrics().active_streams = active.len();
                s.send(Event::Failed { message: e.to_string() });
            }
            if decoding {
                break;
            }
        }
        step(&model, &mut active, &shared);
        active.retain(|s| !s.job.events.is_closed() && (s.next.is_some() || s.read < s.job.prompt.len()));
        let mut m = shared.metrics();
        m.active_streams = active.len();
        m.state_bytes = active.iter().filter_map(|s| s.state.as_ref()).map(DecodeState::bytes).sum();
    }
}

/// Moves waiting streams into free slots (dropping those whose client already left).
fn admit(shared: &Shared, active: &mut Vec<Stream>, slots: usize) {
    let mut queue = shared.queue.lock().expect("queue lock");
    while active.len() < slots {
        let Some(job) = queue.pop_front() else { break };
        if job.events.is_closed() {
            continue;
        }
        let text = TextStream::new(job.stop.clone(), &shared.codec, &job.prompt);
        active.push(Stream { job, state: None, read: 0, next: None, generated: 0, text, last_token: Instant::now() });
    }
    shared.metrics().queue_depth = queue.len();
}

/// Reads the next piece of a stream's prompt, as `LinearAttentionTransformerLM::read_prompt`
/// does; after the last piece the stream samples its first token.
fn read_piece(model: &LinearAttentionTransformerLM, s: &mut Stream, shared: &Shared) -> linear_attention_transformer::Result<()> {
    let end = (s.read + PROMPT_CHUNK).min(s.job.prompt.len());
    let piece = &s.job.prompt[s.read..end];
    let state = match &mut s.state {
        Some(state) => state,
        None => s.state.insert(model.start_with(&Inputs::default())?),
    };
    let logits = model.extend(piece, state)?;
    s.read = end;
    let mut m = shared.metrics();
    m.prompt_tokens += piece.len() as u64;
    if s.read == s.job.prompt.len() {
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let t = s.draw(&row);
        s.take(t, &mut m);
    }
    Ok(())
}

/// One batched step of every decoding stream.
fn step(model: &LinearAttentionTransformerLM, active: &mut [Stream], shared: &Shared) {
    let mut batch: Vec<&mut Stream> = active.iter_mut().filter(|s| s.next.is_some() && !s.job.events.is_closed()).collect();
    if batch.is_empty() {
        return;
    }
    let tokens: Vec<u32> = batch.iter_mut().map(|s| s.next.take().expect("decoding")).collect();
    let result = {
        let mut states: Vec<&mut DecodeState> = batch.iter_mut().map(|s| s.state.as_mut().expect("a decoding stream has a state")).collect();
        model.step_streams(&tokens, &mut states).and_then(|l| Ok(l.to_vec2::<f32>()?))
    };
    let mut m = shared.metrics();
    m.decode_steps += 1;
    m.batch_size = batch.len();
    m.step_batch.observe(batch.len() as f64);
    match result {
        Ok(logits) => {
            // Each stream draws from its own generator, so the streams draw in parallel.
            let drawn: Vec<u32> = batch.par_iter_mut().zip(&logits).map(|(s, row)| s.draw(row)).collect();
            for (s, t) in batch.iter_mut().zip(drawn) {
                s.take(t, &mut m);
            }
        }
        Err(e) => {
            for s in batch {
                m.active_streams = m.active_streams.saturating_sub(1);
                s.send(Event::Failed { message: e.to_string() });
            }
        }
    }
}

/// Counts a request's outcome.
pub fn finished(shared: &Shared, outcome: Outcome) {
    shared.metrics().request(outcome);
}

//! `lat serve --model M [--host 127.0.0.1] [--port 8080] [--max-batch 32] [--max-queue 256]
//! [--max-tokens-cap N] [--grace-period 30s] [--device cpu|cuda]`: an OpenAI-compatible
//! completions server that decodes every active stream together (engine.rs).
//!
//! Routes: `POST /v1/completions` (JSON, or server-sent events with `"stream": true`),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). Bad requests get 400 with a JSON
//! error naming the field, a full queue 429. SIGTERM or Ctrl-C stops accepting, lets the streams
//! in flight finish within the grace period, and exits 0.

mod api;
mod engine;
mod metrics;
mod text;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use linear_attention_transformer::rng::{derive, mix, Rng};
use linear_attention_transformer::{checkpoint, LinearAttentionTransformerLM};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::commands::{device, usage, ModelArgs, Result};
use api::{error_body, Completion, Limits};
use engine::{Event, Job, Shared};
use metrics::{Metrics, Outcome};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (loopback unless you mean otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Streams decoded together at most; more wait in the queue.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Streams that may wait for a slot; beyond that requests get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// The most new tokens one request may ask for (default: the model's positions).
    #[arg(long)]
    max_tokens_cap: Option<usize>,
    /// After SIGTERM or Ctrl-C, how long the streams in flight may take to finish.
    #[arg(long, default_value = "30s")]
    grace_period: String,
    /// The model's name in responses and /v1/models (default: the file's stem).
    #[arg(long)]
    served_name: Option<String>,
    /// cpu, or cuda in builds with the cuda feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Slots are sized against this memory (default: what the system has available).
    #[command(flatten)]
    memory: crate::commands::memory::MemoryArgs,
}

/// What every handler reads.
struct App {
    shared: Arc<Shared>,
    limits: Limits,
    name: String,
    started: SystemTime,
    ids: AtomicU64,
}

pub fn run(a: Args) -> Result<()> {
    let dev = device::parse(&a.device)?;
    if a.max_batch == 0 {
        return Err(usage("--max-batch must be at least 1"));
    }
    let slots = slots(&a)?;
    let model = checkpoint::load(&a.model.path, &dev, false)?;
    check_servable(&model)?;
    let Some(codec) = a.model.codec(model.config())? else {
        return Err(usage(format!("this model has {} token ids but no tokenizer: give --tokenizer, or serve its model directory (with tokenizer.json)", model.config().num_tokens)));
    };
    let grace = humantime::parse_duration(&a.grace_period).map_err(|e| usage(format!("--grace-period {}: {e}", a.grace_period)))?;
    let context = model.decode_limit();
    let limits = Limits { num_tokens: model.config().num_tokens, context, max_tokens_cap: a.max_tokens_cap.unwrap_or(context).min(context) };
    let per_stream = model.max_state_bytes();
    let shared = Shared::new(a.max_queue, Metrics::new(slots, a.max_queue, per_stream), codec);
    let name = a
        .served_name
        .clone()
        .unwrap_or_else(|| a.model.path.file_stem().filter(|_| a.model.path.is_file()).or(a.model.path.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()));
    let app = Arc::new(App { shared: shared.clone(), limits, name, started: SystemTime::now(), ids: AtomicU64::new(0) });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(|e| usage(format!("cannot start the HTTP runtime: {e}")))?;
    // The HTTP side on a thread of its own, the decoding loop on this one: a worker of the
    // kernels' thread pool (see main), so that a step's parallel loops have every worker, not
    // all but the one an HTTP runtime would block.
    let http = {
        let (shared, host, port) = (shared.clone(), a.host.clone(), a.port);
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                let served = runtime.block_on(serve(app, &host, port, slots, per_stream, grace));
                // Dropping the runtime closes every stream's events, so the loop lets them go
                // (it looks at least every 200 ms).
                drop(runtime);
                shared.stopping.store(true, Ordering::SeqCst);
                served
            })
            .map_err(|e| usage(format!("cannot start the HTTP thread: {e}")))?
    };
    engine::run(model, shared, slots);
    http.join().map_err(|_| usage("the HTTP thread panicked"))?
}

/// How many streams fit in memory beside the model, at most `--max-batch`: the memory plan of
/// the model and one prompt piece, plus each stream's state at its bound.
fn slots(a: &Args) -> Result<usize> {
    use linear_attention_transformer::plan::{human, Workload};
    let (config, _) = checkpoint::peek(&a.model.path)?;
    let plan = |streams| crate::commands::plan::inference_plan(&config, Workload::Generate { streams, prompt_len: linear_attention_transformer::PROMPT_CHUNK });
    let fixed = plan(0)?.total;
    let per_stream = plan(1)?.total - fixed;
    let Some(limit) = a.memory.limit()? else { return Ok(a.max_batch) };
    let fit = (limit.saturating_sub(fixed) / per_stream.max(1)) as usize;
    if fit >= a.max_batch || a.memory.force {
        return Ok(a.max_batch);
    }
    if fit == 0 {
        return Err(usage(format!("the model needs about {} and each stream {}, but {} is available: not even one stream fits (or pass --force)", human(fixed), human(per_stream), human(limit))));
    }
    eprintln!("lat serve: memory for {fit} streams ({} each beside {} for the model), fewer than --max-batch {}", human(per_stream), human(fixed), a.max_batch);
    Ok(fit)
}

/// Models the completions API can drive: causal language models with logits, that need no
/// context.
fn check_servable(model: &LinearAttentionTransformerLM) -> Result<()> {
    let c = model.config();
    if !c.causal || c.return_embeddings {
        return Err(usage("lat serve needs a causal language model with logits (causal = true, return_embeddings = false)"));
    }
    if c.receives_context {
        return Err(usage("this model is a decoder with cross-attention: each request would need a context, which the completions API has no field for"));
    }
    Ok(())
}

async fn serve(app: Arc<App>, host: &str, port: u16, slots: usize, per_stream: usize, grace: Duration) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port)).await.map_err(|e| usage(format!("cannot listen on {host}:{port}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| usage(format!("no local address: {e}")))?;
    println!("lat serve: listening on http://{addr} (model {}, {slots} slots, {} KiB of state per stream)", app.name, per_stream.div_ceil(1024));
    let router = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(error_body("no such route", "not_found", None, Some(404)))) })
        .with_state(app.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        println!("lat serve: stopping; the streams in flight may finish");
        stop_tx.send(true).ok();
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        rx.wait_for(|&s| s).await.ok();
    };
    let server = axum::serve(listener, router).with_graceful_shutdown(stopped(stop_rx.clone()));
    let grace_over = async {
        stopped(stop_rx.clone()).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r.map_err(|e| usage(format!("the server failed: {e}")))?,
        _ = grace_over => println!("lat serve: grace period over; closing the remaining streams"),
    }
    app.shared.stopping.store(true, Ordering::SeqCst);
    println!("lat serve: stopped");
    Ok(())
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.ok();
}

fn json_error(status: StatusCode, message: &str, kind: &str, param: Option<&str>) -> Response {
    (status, Json(error_body(message, kind, param, Some(status.as_u16())))).into_response()
}

/// Counts a request as cancelled unless it is marked done first (a dropped handler or stream
/// is a client that left).
struct Tally {
    shared: Arc<Shared>,
    outcome: Option<Outcome>,
}

impl Tally {
    fn done(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        engine::finished(&self.shared, self.outcome.unwrap_or(Outcome::Cancelled));
    }
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let c = match api::parse(&body, &app.limits, &|s: &str| app.shared.codec.encode(s.as_bytes()).map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => {
            engine::finished(&app.shared, Outcome::BadRequest);
            return json_error(StatusCode::BAD_REQUEST, &e.message, "invalid_request_error", e.param.as_deref());
        }
    };
    let id = format!("cmpl-{:x}", app.ids.fetch_add(1, Ordering::Relaxed));
    let seed = c.seed.unwrap_or_else(|| mix(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64) ^ app.ids.load(Ordering::Relaxed)));
    let (tx, rx) = unbounded_channel();
    let arrived = Instant::now();
    let jobs: Vec<Job> = c
        .prompts
        .iter()
        .enumerate()
        .flat_map(|(p, prompt)| (0..c.n).map(move |choice| (p * c.n + choice, prompt)))
        .map(|(index, prompt)| Job {
            index,
            prompt: prompt.clone(),
            max_tokens: c.max_tokens,
            sampling: c.sampling.clone(),
            // Choice `index` draws as row `index` of `lat generate --seed S` does.
            rng: Rng::new(derive(seed, index as u64)),
            stop: c.stop.clone(),
            eos: None,
            events: tx.clone(),
            arrived,
        })
        .collect();
    drop(tx);
    if app.shared.submit(jobs).is_err() {
        engine::finished(&app.shared, Outcome::Rejected);
        return json_error(StatusCode::TOO_MANY_REQUESTS, "the server is at capacity: every slot is busy and the queue is full; retry later", "server_busy", None);
    }
    let tally = Tally { shared: app.shared.clone(), outcome: None };
    let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let head = Head { id, created, model: app.name.clone(), choices: c.prompts.len() * c.n, prompt_tokens: c.prompts.iter().map(Vec::len).sum() };
    if c.stream {
        stream_response(head, c, rx, tally).into_response()
    } else {
        whole_response(head, rx, tally).await
    }
}

/// What every response of a request repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
    choices: usize,
    prompt_tokens: usize,
}

impl Head {
    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices})
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": self.prompt_tokens + completion_tokens})
    }
}

async fn whole_response(head: Head, mut rx: UnboundedReceiver<Event>, mut tally: Tally) -> Response {
    let mut texts = vec![String::new(); head.choices];
    let mut reasons: Vec<Option<&'static str>> = vec![None; head.choices];
    let mut completion_tokens = 0;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text { index, text } => texts[index].push_str(&text),
            Event::Done { index, finish_reason, completion_tokens: n, .. } => {
                reasons[index] = Some(finish_reason);
                completion_tokens += n;
            }
            Event::Failed { message, .. } => {
                tally.done(Outcome::Error);
                return json_error(StatusCode::INTERNAL_SERVER_ERROR, &message, "server_error", None);
            }
        }
    }
    if reasons.iter().any(Option::is_none) {
        tally.done(Outcome::Error);
        return json_error(StatusCode::INTERNAL_SERVER_ERROR, "the server stopped before the completion was done", "server_error", None);
    }
    tally.done(Outcome::Ok);
    let choices: Vec<Value> = texts.into_iter().zip(reasons).enumerate().map(|(i, (text, r))| json!({"text": text, "index": i, "logprobs": null, "finish_reason": r})).collect();
    let mut body = head.chunk(Value::Array(choices));
    body["usage"] = head.usage(completion_tokens);
    Json(body).into_response()
}

fn stream_response(head: Head, c: Completion, rx: UnboundedReceiver<Event>, tally: Tally) -> Sse<impl futures_util::Stream<Item = std::result::Result<SseEvent, Infallible>>> {
    struct Progress {
        head: Head,
        rx: UnboundedReceiver<Event>,
        tally: Tally,
        include_usage: bool,
        completion_tokens: usize,
        open: usize,
        /// Events to send before reading more (the end of the stream).
        tail: std::collections::VecDeque<String>,
        finished: bool,
    }
    let open = head.choices;
    let start = Progress { head, rx, tally, include_usage: c.include_usage, completion_tokens: 0, open, tail: Default::default(), finished: false };
    let events = futures_util::stream::unfold(start, |mut p| async move {
        if let Some(data) = p.tail.pop_front() {
            return Some((Ok(SseEvent::default().data(ascii(&data))), p));
        }
        if p.finished {
            return None;
        }
        let data = match p.rx.recv().await {
            Some(Event::Text { index, text }) => p.head.chunk(json!([{"text": text, "index": index, "logprobs": null, "finish_reason": null}])).to_string(),
            Some(Event::Done { index, finish_reason, completion_tokens, .. }) => {
                p.completion_tokens += completion_tokens;
                p.open -= 1;
                p.head.chunk(json!([{"text": "", "index": index, "logprobs": null, "finish_reason": finish_reason}])).to_string()
            }
            Some(Event::Failed { message, .. }) => {
                p.tally.done(Outcome::Error);
                p.finished = true;
                p.tail.push_back("[DONE]".into());
                error_body(&message, "server_error", None, Some(500)).to_string()
            }
            None if p.open > 0 => {
                p.tally.done(Outcome::Error);
                p.finished = true;
                p.tail.push_back("[DONE]".into());
                error_body("the server stopped before the completion was done", "server_error", None, Some(500)).to_string()
            }
            None => {
                // Every choice is over: the usage (when asked for), then the end.
                p.tally.done(Outcome::Ok);
                p.finished = true;
                if p.include_usage {
                    let mut last = p.head.chunk(json!([]));
                    last["usage"] = p.head.usage(p.completion_tokens);
                    p.tail.push_back("[DONE]".into());
                    last.to_string()
                } else {
                    "[DONE]".into()
                }
            }
        };
        Some((Ok(SseEvent::default().data(ascii(&data))), p))
    });
    Sse::new(events)
}

/// JSON text with every non-ASCII character escaped (`\uXXXX`): some clients split event lines
/// at Unicode line separators (U+0085, U+2028, U+2029), which JSON may hold unescaped.
fn ascii(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let created = app.started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Json(json!({"object": "list", "data": [{"id": app.name, "object": "model", "created": created, "owned_by": "lat"}]}))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.shared.stopping.load(Ordering::SeqCst) {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "stopping", "unavailable", None);
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.shared.metrics().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_json_is_ascii() {
        let s = super::ascii("{\"text\":\"é\u{2028}😀\"}");
        assert_eq!(s, r#"{"text":"\u00e9\u2028\ud83d\ude00"}"#);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&s).unwrap()["text"], "é\u{2028}😀");
    }
}

//! `lat serve` over loopback with a real HTTP client: completions whole and streamed, 32
//! concurrent requests that each equal what `lat generate` gives, clients that leave mid-stream,
//! the full queue's 429, bad requests' 400s, and a graceful shutdown.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use linear_attention_transformer::generate::{generate, Sampling};
use linear_attention_transformer::{checkpoint, Config, LinearAttentionTransformerLM, LocalHeads};
use serde_json::{json, Value};

fn lat() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lat"))
}

/// A small byte-level model (random weights), written once.
fn model() -> &'static (PathBuf, LinearAttentionTransformerLM) {
    static MODEL: OnceLock<(PathBuf, LinearAttentionTransformerLM)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut c = Config::new(256, 32, 2, 256);
        c.heads = 2;
        c.dim_head = Some(16);
        c.causal = true;
        c.n_local_attn_heads = LocalHeads::Uniform(1);
        c.local_attn_window_size = 16;
        c.blindspot_size = 4;
        c.shift_tokens = true;
        let m = LinearAttentionTransformerLM::new(&c, 11, &Device::Cpu, DType::F32).unwrap();
        (saved(&m, "bytes"), m)
    })
}

/// `m` saved as NAME.safetensors in this test process's folder.
fn saved(m: &LinearAttentionTransformerLM, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lat-serve-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.safetensors"));
    checkpoint::save(m, &path, &Default::default()).unwrap();
    path
}

/// A model wide enough that a long stream holds its slot for a while (a few ms a token), for
/// the tests that must act while it decodes.
fn slow_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut c = Config::new(256, 512, 4, 256);
        c.heads = 8;
        c.dim_head = Some(64);
        c.causal = true;
        c.n_local_attn_heads = LocalHeads::Uniform(4);
        c.local_attn_window_size = 16;
        saved(&LinearAttentionTransformerLM::new(&c, 12, &Device::Cpu, DType::F32).unwrap(), "slow")
    })
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Self {
        let mut child = lat().args(["serve", "--model", model.to_str().unwrap(), "--port", "0"]).args(extra).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
        Self { child, url: format!("http://{addr}") }
    }

    fn post(&self, body: &Value) -> (u16, Value) {
        match ureq::post(&format!("{}/v1/completions", self.url)).send_string(&body.to_string()) {
            Ok(r) => (r.status(), serde_json::from_str(&r.into_string().unwrap()).unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, serde_json::from_str(&r.into_string().unwrap()).unwrap()),
            Err(e) => panic!("{e}"),
        }
    }

    /// A streamed completion: the text of each choice and their finish reasons.
    fn stream(&self, body: &Value) -> (Vec<String>, Vec<String>) {
        let r = ureq::post(&format!("{}/v1/completions", self.url)).send_string(&body.to_string()).unwrap();
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let (mut texts, mut reasons) = (vec![String::new(); 4], vec![String::new(); 4]);
        let mut done = false;
        for line in BufReader::new(r.into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                done = true;
                break;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            for c in v["choices"].as_array().unwrap() {
                let i = c["index"].as_u64().unwrap() as usize;
                texts[i].push_str(c["text"].as_str().unwrap());
                if let Some(r) = c["finish_reason"].as_str() {
                    reasons[i] = r.to_string();
                }
            }
        }
        assert!(done, "the stream ended without [DONE]");
        let n = reasons.iter().filter(|r| !r.is_empty()).count();
        (texts[..n].to_vec(), reasons[..n].to_vec())
    }

    fn get(&self, path: &str) -> String {
        ureq::get(&format!("{}{path}", self.url)).call().unwrap().into_string().unwrap()
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics");
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("no {name} in {text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// What `lat generate` gives for a prompt (the library function behind it), as text cut at the
/// first stop string.
fn expected(prompt: &str, max_tokens: usize, sampling: &Sampling, seed: u64, stop: &[&str]) -> (String, &'static str) {
    let (_, m) = model();
    let tokens = generate(m, &[prompt.bytes().map(u32::from).collect()], max_tokens, sampling, seed, None, true, &mut |_, _| {}).unwrap();
    let text = String::from_utf8_lossy(&tokens[0].iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned();
    match stop.iter().filter_map(|s| text.find(s)).min() {
        Some(at) => (text[..at].to_string(), "stop"),
        None => (text, "length"),
    }
}

#[test]
fn completions_equal_lat_generate_whole_and_streamed() {
    let (path, _) = model();
    let server = Server::start(path, &[]);
    assert_eq!(server.get("/health"), r#"{"status":"ok"}"#);
    let models: Value = serde_json::from_str(&server.get("/v1/models")).unwrap();
    assert_eq!(models["data"][0]["id"], "bytes");
    // Greedy, through the server and through the command itself.
    let (status, body) = server.post(&json!({"model": "bytes", "prompt": "To be, or not", "max_tokens": 24, "temperature": 0}));
    assert_eq!(status, 200, "{body}");
    let out = lat().args(["generate", "--model", path.to_str().unwrap(), "--prompt", "To be, or not", "--max-new", "24", "--top-k", "1", "--json"]).output().unwrap();
    let tokens: Vec<u8> = serde_json::from_slice::<Value>(&out.stdout).unwrap()["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u8).collect();
    assert_eq!(body["choices"][0]["text"], String::from_utf8_lossy(&tokens).as_ref());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"], json!({"prompt_tokens": 13, "completion_tokens": 24, "total_tokens": 37}));
    // Seeded sampling, streamed, with a list of prompts: choice i is row i of lat generate.
    let sampling = Sampling { temperature: 0.9, top_k: Some(40), top_p: Some(0.95) };
    let (texts, reasons) = server.stream(&json!({"prompt": ["Once", "upon a time"], "max_tokens": 30, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 5, "stream": true}));
    let rows: Vec<Vec<u32>> = ["Once", "upon a time"].iter().map(|p| p.bytes().map(u32::from).collect()).collect();
    let want = generate(&model().1, &rows, 30, &sampling, 5, None, true, &mut |_, _| {}).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(texts[i], String::from_utf8_lossy(&w.iter().map(|&t| t as u8).collect::<Vec<_>>()).as_ref(), "choice {i}");
        assert_eq!(reasons[i], "length");
    }
    // A long prompt is read in pieces, exactly as lat generate reads it.
    let long: String = "All the world's a stage, ".repeat(8);
    let (_, body) = server.post(&json!({"prompt": long, "max_tokens": 10, "temperature": 0}));
    assert_eq!(body["choices"][0]["text"], expected(&long, 10, &Sampling::greedy(), 0, &[]).0);
    assert!(server.metric("lat_prompt_tokens_total") >= 200.0 + 13.0);
}

#[test]
fn thirty_two_concurrent_requests_each_equal_lat_generate() {
    let (path, _) = model();
    // Fewer slots than requests: streams join and leave the batch while others decode.
    let server = Server::start(path, &["--max-batch", "12"]);
    let cases: Vec<(String, usize, Value, Sampling, u64, Vec<&str>)> = (0..32)
        .map(|i| {
            let prompt = format!("{} {}", ["Now is the winter", "Friends, Romans", "If music be", "What light"][i % 4], "x".repeat(i * 3));
            let max_tokens = 5 + (i * 7) % 40;
            let stop: Vec<&str> = if i % 5 == 0 { vec!["e", "\n"] } else { vec![] };
            let (settings, sampling, seed) = match i % 3 {
                0 => (json!({"temperature": 0}), Sampling::greedy(), 0),
                1 => (json!({"temperature": 0.7, "seed": i}), Sampling { temperature: 0.7, top_k: None, top_p: None }, i as u64),
                _ => (json!({"temperature": 1.2, "top_p": 0.8, "top_k": 30, "seed": 100 + i}), Sampling { temperature: 1.2, top_k: Some(30), top_p: Some(0.8) }, 100 + i as u64),
            };
            (prompt, max_tokens, settings, sampling, seed, stop)
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (prompt, max_tokens, settings, _, _, stop))| {
                let server = &server;
                s.spawn(move || {
                    let mut body = json!({"prompt": prompt, "max_tokens": max_tokens, "stop": stop, "stream": i % 2 == 0});
                    body.as_object_mut().unwrap().extend(settings.as_object().unwrap().clone());
                    if i % 2 == 0 {
                        let (texts, reasons) = server.stream(&body);
                        (texts[0].clone(), reasons[0].clone())
                    } else {
                        let (status, v) = server.post(&body);
                        assert_eq!(status, 200, "{v}");
                        (v["choices"][0]["text"].as_str().unwrap().to_string(), v["choices"][0]["finish_reason"].as_str().unwrap().to_string())
                    }
                })
            })
            .collect();
        for (i, (h, (prompt, max_tokens, _, sampling, seed, stop))) in handles.into_iter().zip(&cases).enumerate() {
            let (text, reason) = h.join().unwrap();
            let (want, want_reason) = expected(prompt, *max_tokens, sampling, *seed, stop);
            assert_eq!((text, reason.as_str()), (want, want_reason), "request {i}");
        }
    });
    assert_eq!(server.metric("lat_requests_total{outcome=\"ok\"}"), 32.0);
    assert!(server.metric("lat_step_batch_size_count") > 0.0);
}

#[test]
fn clients_that_leave_free_their_slot_and_a_full_queue_is_429() {
    let server = Server::start(slow_model(), &["--max-batch", "1", "--max-queue", "1"]);
    // A long stream takes the only slot; its client reads one event and leaves.
    let r = ureq::post(&format!("{}/v1/completions", server.url)).send_string(&json!({"prompt": "a", "max_tokens": 200, "stream": true}).to_string()).unwrap();
    let mut reader = BufReader::new(r.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    // While it holds the slot, one more request waits in the queue and the next is refused.
    let waiting = {
        let url = server.url.clone();
        std::thread::spawn(move || ureq::post(&format!("{url}/v1/completions")).send_string(&json!({"prompt": "b", "max_tokens": 3}).to_string()).map(|r| r.status()))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("lat_queue_depth") < 1.0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = server.post(&json!({"prompt": "c", "max_tokens": 3}));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "server_busy");
    drop(reader);
    // The slot frees at once: the queued request completes long before 200 tokens could.
    assert_eq!(waiting.join().unwrap().unwrap(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("lat_requests_total{outcome=\"cancelled\"}") < 1.0 {
        assert!(Instant::now() < deadline, "the departed client was not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.metric("lat_generated_tokens_total") < 150.0, "the abandoned stream kept decoding");
    assert_eq!(server.metric("lat_requests_total{outcome=\"rejected\"}"), 1.0);
    assert_eq!(server.metric("lat_active_streams"), 0.0);
}

#[test]
fn bad_requests_get_400_naming_the_field_and_the_server_keeps_serving() {
    let (path, _) = model();
    let server = Server::start(path, &["--max-tokens-cap", "64"]);
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("{\"prompt\": \"a\",", None),
        ("[1, 2]", None),
        (r#"{"prompt": "a", "temprature": 0.5}"#, Some("temprature")),
        (r#"{"prompt": "a", "max_tokens": -1}"#, Some("max_tokens")),
        (r#"{"prompt": "a", "max_tokens": 65}"#, Some("max_tokens")),
        (r#"{"prompt": "a", "max_tokens": 1e12}"#, Some("max_tokens")),
        (r#"{"prompt": [1, 256]}"#, Some("prompt")),
        (r#"{"prompt": [-1]}"#, Some("prompt")),
        (r#"{"prompt": ""}"#, Some("prompt")),
        (r#"{"prompt": []}"#, Some("prompt")),
        (r#"{"prompt": [[]]}"#, Some("prompt")),
        (r#"{"max_tokens": 4}"#, Some("prompt")),
        (r#"{"prompt": "a", "temperature": "hot"}"#, Some("temperature")),
        (r#"{"prompt": "a", "stream": "yes"}"#, Some("stream")),
        (r#"{"prompt": "a", "stop": ["", "x"]}"#, Some("stop")),
        (r#"{"prompt": "a", "echo": true}"#, Some("echo")),
    ];
    for (body, param) in cases {
        let r = ureq::post(&format!("{}/v1/completions", server.url)).send_string(body);
        let Err(ureq::Error::Status(400, r)) = r else { panic!("{body}: not a 400") };
        let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
        assert_eq!(v["error"]["param"].as_str(), param, "{body}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, _) = server.post(&json!({"prompt": "still here", "max_tokens": 2}));
    assert_eq!(status, 200);
    assert_eq!(server.metric("lat_requests_total{outcome=\"bad_request\"}"), 16.0);
    // Not a route.
    let Err(ureq::Error::Status(404, _)) = ureq::get(&format!("{}/v2/nothing", server.url)).call() else { panic!("no 404") };
}

#[test]
fn sigterm_lets_streams_in_flight_finish_then_exits_0() {
    let (path, _) = model();
    let mut server = Server::start(path, &["--grace-period", "20s"]);
    let r = ureq::post(&format!("{}/v1/completions", server.url)).send_string(&json!({"prompt": "z", "max_tokens": 120, "stream": true}).to_string()).unwrap();
    let mut reader = BufReader::new(r.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\"") && rest.trim_end().ends_with("data: [DONE]"), "the stream was cut: {rest}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit {status}");
    assert!(ureq::get(&format!("{}/health", server.url)).timeout(Duration::from_secs(2)).call().is_err(), "still accepting");
}

#[test]
fn models_that_cannot_be_served_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encoder.safetensors");
    let m = LinearAttentionTransformerLM::new(&Config::new(256, 16, 1, 32), 0, &Device::Cpu, DType::F32).unwrap();
    checkpoint::save(&m, &path, &Default::default()).unwrap();
    let out = lat().args(["serve", "--model", path.to_str().unwrap(), "--port", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.lines().count() == 1 && err.contains("causal"), "{err}");
}

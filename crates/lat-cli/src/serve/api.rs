//! The OpenAI completions request, read field by field so that every error names its field, and
//! the JSON the server answers with.

use serde_json::{json, Map, Value};

use linear_attention_transformer::generate::Sampling;

/// What a request may ask for, and the model's limits.
pub struct Limits {
    pub num_tokens: usize,
    /// Positions a stream can reach (prompt plus new tokens).
    pub context: usize,
    /// The most new tokens a request may ask for.
    pub max_tokens_cap: usize,
}

/// A valid completion request.
#[derive(Debug)]
pub struct Completion {
    pub prompts: Vec<Vec<u32>>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices per prompt.
    pub n: usize,
}

/// A 400 answer: what is wrong, and with which field.
#[derive(Debug)]
pub struct BadRequest {
    pub param: Option<String>,
    pub message: String,
}

/// A bad `param`; `message` continues its name ("max_tokens must be …").
fn bad(param: &str, message: impl std::fmt::Display) -> BadRequest {
    BadRequest { param: Some(param.to_string()), message: format!("{param} {message}") }
}

/// The OpenAI error body.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<u16>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

/// The fields this server reads; OpenAI fields it cannot honour are accepted only at their
/// neutral values.
const FIELDS: [&str; 18] = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "logprobs",
    "echo",
    "suffix",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
];

/// Turns prompt text into tokens, or says why it cannot.
pub type Encode<'a> = &'a dyn Fn(&str) -> Result<Vec<u32>, String>;

/// Reads a request body.
pub fn parse(body: &[u8], limits: &Limits, encode: Encode) -> Result<Completion, BadRequest> {
    let value: Value = serde_json::from_slice(body).map_err(|e| BadRequest { param: None, message: format!("the body is not valid JSON: {e}") })?;
    let Value::Object(map) = value else { return Err(BadRequest { param: None, message: "the body must be a JSON object".into() }) };
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str()) && k.as_str() != "logit_bias") {
        return Err(BadRequest { param: Some(unknown.clone()), message: format!("unknown field `{unknown}`") });
    }
    let field = |name: &str| map.get(name).filter(|v| !v.is_null());
    if let Some(m) = field("model") {
        if !m.is_string() {
            return Err(bad("model", "must be a string"));
        }
    }
    unsupported(&map)?;
    let prompts = prompts(field("prompt").ok_or_else(|| bad("prompt", "is required"))?, limits, encode)?;
    let max_tokens = match field("max_tokens") {
        None => 16,
        Some(v) => v.as_u64().filter(|&n| n >= 1).ok_or_else(|| bad("max_tokens", format!("must be a positive integer, got {v}")))? as usize,
    };
    if max_tokens > limits.max_tokens_cap {
        return Err(bad("max_tokens", format!("is {max_tokens}, more than this server's cap of {}", limits.max_tokens_cap)));
    }
    if let Some(longest) = prompts.iter().map(Vec::len).max().filter(|&l| l + max_tokens > limits.context) {
        return Err(bad("max_tokens", format!("is too large: the prompt ({longest} tokens) and {max_tokens} new tokens exceed the model's {} positions", limits.context)));
    }
    let number =
        |name: &str| -> Result<Option<f64>, BadRequest> { field(name).map(|v| v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| bad(name, format!("must be a number, got {v}")))).transpose() };
    let temperature = number("temperature")?.unwrap_or(1.0);
    if !(0.0..=100.0).contains(&temperature) {
        return Err(bad("temperature", format!("must be between 0 and 100, got {temperature}")));
    }
    let top_p = number("top_p")?;
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(bad("top_p", "must be in (0, 1]"));
    }
    let top_k = match field("top_k") {
        None => None,
        Some(v) => Some(v.as_u64().filter(|&k| k >= 1).ok_or_else(|| bad("top_k", format!("must be a positive integer, got {v}")))? as usize),
    };
    // temperature 0 is greedy, as in the OpenAI API.
    let sampling = if temperature == 0.0 { Sampling::greedy() } else { Sampling { temperature, top_k, top_p: top_p.filter(|&p| p < 1.0) } };
    let seed = field("seed").map(|v| v.as_u64().ok_or_else(|| bad("seed", format!("must be a non-negative integer, got {v}")))).transpose()?;
    let stop = match field("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().map(|s| s.as_str().map(str::to_string).ok_or_else(|| bad("stop", "must be a string or a list of strings"))).collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("stop", "must be a string or a list of strings")),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(bad("stop", "takes at most 4 non-empty strings"));
    }
    let stream = match field("stream") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| bad("stream", "must be true or false"))?,
    };
    let include_usage = match field("stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| k.as_str() != "include_usage") {
                return Err(bad("stream_options", format!("has an unknown field `{k}`")));
            }
            o.get("include_usage").map(|v| v.as_bool().ok_or_else(|| bad("stream_options", "needs include_usage true or false"))).transpose()?.unwrap_or(false)
        }
        Some(_) => return Err(bad("stream_options", "must be an object")),
    };
    let n = match field("n") {
        None => 1,
        Some(v) => v.as_u64().filter(|&n| (1..=16).contains(&n)).ok_or_else(|| bad("n", format!("must be an integer from 1 to 16, got {v}")))? as usize,
    };
    Ok(Completion { prompts, max_tokens, sampling, seed, stop, stream, include_usage, n })
}

/// OpenAI fields with no counterpart here are refused unless they ask for nothing.
fn unsupported(map: &Map<String, Value>) -> Result<(), BadRequest> {
    let neutral = |name: &str, ok: &dyn Fn(&Value) -> bool| -> Result<(), BadRequest> {
        match map.get(name) {
            Some(v) if !v.is_null() && !ok(v) => Err(bad(name, format!("is not supported by this server (got {v})"))),
            _ => Ok(()),
        }
    };
    neutral("logprobs", &|v| v.as_u64() == Some(0))?;
    neutral("echo", &|v| v.as_bool() == Some(false))?;
    neutral("suffix", &|v| v.as_str() == Some(""))?;
    neutral("best_of", &|v| v.as_u64() == Some(1))?;
    neutral("presence_penalty", &|v| v.as_f64() == Some(0.0))?;
    neutral("frequency_penalty", &|v| v.as_f64() == Some(0.0))?;
    neutral("logit_bias", &|v| v.as_object().is_some_and(|o| o.is_empty()))?;
    neutral("user", &|v| v.is_string())
}

/// A string, a list of strings, a list of token ids, or a list of such lists.
fn prompts(v: &Value, limits: &Limits, encode: Encode) -> Result<Vec<Vec<u32>>, BadRequest> {
    let ids = |items: &[Value]| -> Result<Vec<u32>, BadRequest> {
        items
            .iter()
            .map(|t| match t.as_u64() {
                Some(id) if (id as usize) < limits.num_tokens => Ok(id as u32),
                _ => Err(bad("prompt", format!("has token {t}, outside the vocabulary (0..{})", limits.num_tokens))),
            })
            .collect()
    };
    let text = |s: &str| encode(s).map_err(|e| bad("prompt", format!("cannot be encoded: {e}")));
    let prompts = match v {
        Value::String(s) => vec![text(s)?],
        Value::Array(items) if items.iter().all(Value::is_string) && !items.is_empty() => items.iter().map(|s| text(s.as_str().expect("a string"))).collect::<Result<_, _>>()?,
        Value::Array(items) if items.iter().all(Value::is_array) && !items.is_empty() => items.iter().map(|row| ids(row.as_array().expect("an array"))).collect::<Result<_, _>>()?,
        Value::Array(items) if items.iter().all(Value::is_number) => vec![ids(items)?],
        _ => return Err(bad("prompt", "must be a string, a list of strings, a list of token ids, or a list of such lists")),
    };
    if prompts.iter().any(Vec::is_empty) {
        return Err(bad("prompt", "is empty: give at least one token"));
    }
    if let Some(&t) = prompts.iter().flatten().find(|&&t| t as usize >= limits.num_tokens) {
        return Err(bad("prompt", format!("encodes to token {t}, outside the model's vocabulary (0..{})", limits.num_tokens)));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { num_tokens: 256, context: 512, max_tokens_cap: 256 }
    }

    fn bytes(s: &str) -> Result<Vec<u32>, String> {
        Ok(s.bytes().map(u32::from).collect())
    }

    fn param(body: &str) -> Option<String> {
        parse(body.as_bytes(), &limits(), &bytes).expect_err(body).param
    }

    #[test]
    fn requests_read_as_the_openai_api_defines_them() {
        let c = parse(br#"{"model": "m", "prompt": "hi", "temperature": 0, "stop": "\n", "stream": true}"#, &limits(), &bytes).unwrap();
        assert_eq!((c.prompts, c.max_tokens, c.sampling.top_k, c.stop, c.stream), (vec![vec![104, 105]], 16, Some(1), vec!["\n".to_string()], true));
        let c = parse(br#"{"prompt": [[1, 2], [3]], "max_tokens": 5, "top_p": 0.5, "seed": 7, "n": 2}"#, &limits(), &bytes).unwrap();
        assert_eq!((c.prompts.len(), c.max_tokens, c.sampling.top_p, c.seed, c.n), (2, 5, Some(0.5), Some(7), 2));
        assert_eq!(parse(br#"{"prompt": [5, 6], "logprobs": null, "echo": false}"#, &limits(), &bytes).unwrap().prompts, vec![vec![5, 6]]);
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(param("{not json"), None);
        assert_eq!(param(r#"{"prompt": "a", "colour": 1}"#).as_deref(), Some("colour"));
        assert_eq!(param(r#"{"prompt": "a", "max_tokens": -3}"#).as_deref(), Some("max_tokens"));
        assert_eq!(param(r#"{"prompt": "a", "max_tokens": 100000}"#).as_deref(), Some("max_tokens"));
        assert_eq!(param(r#"{"prompt": [1, 999]}"#).as_deref(), Some("prompt"));
        assert_eq!(param(r#"{"prompt": ""}"#).as_deref(), Some("prompt"));
        assert_eq!(param(r#"{"prompt": []}"#).as_deref(), Some("prompt"));
        assert_eq!(param(r#"{"max_tokens": 3}"#).as_deref(), Some("prompt"));
        assert_eq!(param(r#"{"prompt": "a", "temperature": -1}"#).as_deref(), Some("temperature"));
        assert_eq!(param(r#"{"prompt": "a", "top_p": 0}"#).as_deref(), Some("top_p"));
        assert_eq!(param(r#"{"prompt": "a", "stop": [1]}"#).as_deref(), Some("stop"));
        assert_eq!(param(r#"{"prompt": "a", "logprobs": 3}"#).as_deref(), Some("logprobs"));
        assert_eq!(param(r#"{"prompt": "a", "n": 0}"#).as_deref(), Some("n"));
    }

    #[test]
    fn a_prompt_the_tokenizer_cannot_encode_is_a_bad_prompt_with_the_reason() {
        let refuse = |_: &str| Err("the tokenizer failed".to_string());
        for body in [r#"{"prompt": "a"}"#, r#"{"prompt": ["a", "b"]}"#] {
            let e = parse(body.as_bytes(), &limits(), &refuse).expect_err(body);
            assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("prompt"), "prompt cannot be encoded: the tokenizer failed"), "{body}");
        }
    }
}

//! `lat`: train, evaluate, sample from, import and benchmark linear attention transformers.

mod commands;
mod metrics;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use linear_attention_transformer::allocator;

#[derive(Parser)]
#[command(name = "lat", version, about = "Linear attention transformer language models: train, evaluate, generate, import, benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a state dict of the reference implementation (any torch.save file, a training
    /// checkpoint, or safetensors) into a model file.
    Import(commands::import::Args),
    /// Write a model's state dict for the reference (safetensors or .pt) and its keyword arguments.
    Export(commands::export::Args),
    /// Write a model file with its linear weights in int8 or bf16, for faster decoding.
    Quantize(commands::quantize::Args),
    /// Write the logits of a model for the tokens of a safetensors file.
    Logits(commands::logits::Args),
    /// Train a language model over a tokenizer's tokens or bytes (by default over a BPE of 1024
    /// tokens it learns first, on the bundled Shakespeare).
    Train(commands::train::Args),
    /// Train a tokenizer (byte-level BPE) on a corpus.
    #[command(subcommand)]
    Tokenizer(commands::tokenizer::Command),
    /// The memory a training run or an inference workload needs, before it starts.
    Plan(commands::plan::Args),
    /// Bits per byte (per character) of a model on a corpus split.
    Eval(commands::eval::Args),
    /// Continue a prompt, streaming the new tokens.
    Generate(commands::generate::Args),
    /// Serve completions over HTTP (OpenAI-compatible), decoding every stream together.
    Serve(serve::Args),
    /// Time forward, training or generation for one configuration.
    Bench(commands::bench::Args),
    /// Train an encoder-decoder on the toy copy task and report held-out accuracy.
    CopyTask(commands::copy_task::Args),
    /// Check the kernels and the model on a device against the plain CPU reference.
    Check(commands::check::CheckArgs),
    /// Time one attention kernel, forward and backward.
    KernelBench(commands::check::KernelBenchArgs),
}

impl Command {
    /// What the command mostly does, for the allocator's settings.
    fn work(&self) -> allocator::Work {
        match self {
            Command::Generate(_) | Command::Serve(_) => allocator::Work::Decoding,
            Command::Bench(a) if a.mode == commands::bench::Mode::Generate => allocator::Work::Decoding,
            _ => allocator::Work::WholeSequences,
        }
    }
}

fn main() -> ExitCode {
    // candle's element-wise thread pool spins between jobs, taking cores from the kernels'
    // and matmuls' pool; on few cores it should park at once. An explicit setting wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    // A panic is a bug; it still ends with the one-line error every failure prints.
    std::panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| info.payload().downcast_ref::<String>().cloned());
        eprintln!("error: internal error: {} ({})", msg.unwrap_or_default(), info.location().map(|l| l.to_string()).unwrap_or_default());
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            e.print().ok();
            return ExitCode::from(code);
        }
    };
    allocator::configure(cli.command.work());
    // The command runs on a worker of the thread pool that the kernels split their work over:
    // it takes part in that work instead of waiting for it, and between parallel parts only
    // the other workers look for work, without crowding it off its core.
    let result = rayon::scope(move |_| match cli.command {
        Command::Import(a) => commands::import::run(a),
        Command::Export(a) => commands::export::run(a),
        Command::Quantize(a) => commands::quantize::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Tokenizer(c) => commands::tokenizer::run(c),
        Command::Plan(a) => commands::plan::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::CopyTask(a) => commands::copy_task::run(a),
        Command::Check(a) => commands::check::check(a),
        Command::KernelBench(a) => commands::check::kernel_bench(a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", linear_attention_transformer::error::one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_commands_keep_a_heap_per_thread() {
        let work = |args: &str| Cli::try_parse_from(format!("lat {args}").split(' ')).expect("arguments parse").command.work();
        assert_eq!(work("generate --model m --max-new 4"), allocator::Work::Decoding);
        assert_eq!(work("serve --model m"), allocator::Work::Decoding);
        assert_eq!(work("bench --preset seed --mode generate --seq-len 64"), allocator::Work::Decoding);
        assert_eq!(work("bench --preset seed --mode train --seq-len 64"), allocator::Work::WholeSequences);
        assert_eq!(work("train"), allocator::Work::WholeSequences);
    }
}

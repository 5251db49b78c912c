//! `lat`: train, evaluate, sample from, import and benchmark linear attention transformers.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Training allocates and frees many large tensors per step; mimalloc keeps that memory mapped
// instead of returning it to the kernel and faulting it back in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "lat", version, about = "Linear attention transformer language models: train, evaluate, generate, import, benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a PyTorch state_dict of the reference implementation into a model file.
    Import(commands::import::Args),
    /// Write the logits of a model for the tokens of a safetensors file.
    Logits(commands::logits::Args),
    /// Train a byte-level language model (by default on the bundled Shakespeare).
    Train(commands::train::Args),
    /// Bits per character of a model on a corpus split.
    Eval(commands::eval::Args),
    /// Continue a prompt, streaming the new tokens.
    Generate(commands::generate::Args),
    /// Time forward, training or generation for one configuration.
    Bench(commands::bench::Args),
}

fn main() -> ExitCode {
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
    let result = match cli.command {
        Command::Import(a) => commands::import::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Bench(a) => commands::bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// Errors are printed on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

//! `lat tokenizer train --data PATH --vocab-size N --out tokenizer.json [--split train|all]`:
//! a byte-level BPE trained on a corpus (on every core), which round-trips any text.

use std::path::PathBuf;

use linear_attention_transformer::text::{save_tokenizer, train_bpe, Codec};
use linear_attention_transformer::train::data::Split;

use super::{corpus, usage, Result};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Train a byte-level BPE on a corpus and write it as tokenizer.json.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    source: corpus::Source,
    /// Ids in the vocabulary: 256 bytes, <|endoftext|> and the merges learned.
    #[arg(long)]
    vocab_size: usize,
    /// Where to write the tokenizer.
    #[arg(long)]
    out: PathBuf,
    /// Learn from the training split (the first 90 %, so that evaluation text stays unseen), or
    /// from all of the corpus.
    #[arg(long, default_value = "train")]
    split: String,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Train(a) => train(a),
    }
}

fn train(a: TrainArgs) -> Result<()> {
    let range_of = |text: &linear_attention_transformer::train::data::Text| match a.split.as_str() {
        "all" => Ok(0..text.bytes().len()),
        "train" => Ok(text.split_range(Split::Train)),
        s => Err(usage(format!("--split {s}: use train or all"))),
    };
    if a.out.is_dir() {
        return Err(usage(format!("--out {} is a folder; name the file to write, e.g. {}/tokenizer.json", a.out.display(), a.out.display())));
    }
    let scratch = tempfile::tempdir().map_err(|e| usage(format!("cannot create a temporary folder: {e}")))?;
    let (data, text) = corpus::open(&a.source, scratch.path(), &scratch.path().join("corpus.bin"))?;
    let range = range_of(&text)?;
    let started = std::time::Instant::now();
    let texts = text.chunks(range.clone(), 1 << 16).into_iter().map(|c| String::from_utf8_lossy(&text.bytes()[c.range]).into_owned());
    let tokenizer = train_bpe(texts, a.vocab_size, !a.quiet)?;
    save_tokenizer(&tokenizer, &a.out)?;
    // Read back as every command will read it.
    let codec = Codec::load(&a.out)?;
    let sample = &text.bytes()[range.start..range.end.min(range.start + (1 << 20))];
    let ids = codec.encode(sample)?;
    println!(
        "wrote {}: {} ids, trained on {} bytes of {} in {:.1} s; {:.2} bytes per token on its first MiB",
        a.out.display(),
        codec.vocab_size(),
        range.len(),
        corpus::name(&a.source, &data),
        started.elapsed().as_secs_f64(),
        sample.len() as f64 / ids.len().max(1) as f64
    );
    Ok(())
}

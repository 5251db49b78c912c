//! `lat tokenizer train --data PATH --vocab-size N --out tokenizer.json [--split train|all]`:
//! a byte-level BPE trained on a corpus (on every core), which round-trips any text.

use std::ops::Range;
use std::path::{Path, PathBuf};

use linear_attention_transformer::text::{save_tokenizer, train_bpe, Codec};
use linear_attention_transformer::train::data::{Split, Text};

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
    let (codec, _) = learn(&text, range.clone(), a.vocab_size, usize::MAX, &a.out, !a.quiet)?;
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

/// A byte-level BPE of `vocab_size` ids learned from `range` of `text` (from at most `budget`
/// bytes of it, in pieces spread evenly over it), written to `out` and read back as every command
/// reads it; with the bytes it learned from.
pub fn learn(text: &Text, range: Range<usize>, vocab_size: usize, budget: usize, out: &Path, progress: bool) -> Result<(Codec, usize)> {
    let pieces = spread(text, range, budget);
    let learned = pieces.iter().map(|r| r.len()).sum();
    let texts = pieces.into_iter().map(|r| String::from_utf8_lossy(&text.bytes()[r]).into_owned());
    let tokenizer = train_bpe(texts, vocab_size, progress)?;
    save_tokenizer(&tokenizer, out)?;
    Ok((Codec::load(out)?, learned))
}

/// Pieces of `range` (of at most 64 KiB, cut at line ends and document starts) to learn from: all
/// of them, or, when the range is over `budget`, each piece that keeps what is taken within the
/// budget's share of the range up to its end, so that the sample spans the whole range.
fn spread(text: &Text, range: Range<usize>, budget: usize) -> Vec<Range<usize>> {
    const PIECE: usize = 1 << 16;
    let pieces = text.chunks(range.clone(), PIECE).into_iter().map(|c| c.range);
    if range.len() <= budget {
        return pieces.collect();
    }
    let mut taken = 0;
    pieces
        .filter(|piece| {
            let share = ((piece.end - range.start) as u128 * budget as u128 / range.len() as u128) as usize;
            let keep = taken + piece.len() <= share;
            taken += if keep { piece.len() } else { 0 };
            keep
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_over_budget_spans_the_range_within_the_budget() {
        let line = "a line of text to learn from\n";
        for document_every in [None, Some(1000)] {
            let mut text = Text::from_bytes(line.repeat((1 << 20) / line.len()).into_bytes()).unwrap();
            let n = text.bytes().len();
            if let Some(every) = document_every {
                text.documents = (0..n).step_by(every).collect();
            }
            let all = spread(&text, 100..n, usize::MAX);
            assert_eq!((all[0].start, all.last().unwrap().end), (100, n));
            assert_eq!(all.iter().map(|r| r.len()).sum::<usize>(), n - 100);
            assert_eq!(spread(&text, 100..n, n - 100), all, "a range within budget is taken whole");
            for budget in [1 << 16, 1 << 18, 300_000] {
                let some = spread(&text, 100..n, budget);
                let taken: usize = some.iter().map(|r| r.len()).sum();
                assert!(taken <= budget && taken > budget * 3 / 4, "{document_every:?}, budget {budget}: took {taken}");
                assert!(some[0].start < 100 + n / some.len() && some.last().unwrap().end > n - n / some.len(), "{document_every:?}, budget {budget}: the sample spans the range");
                assert!(some.windows(2).all(|w| w[0].end <= w[1].start));
            }
        }
    }
}

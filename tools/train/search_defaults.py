"""Compares variants of `lat train`'s defaults by the validation split (never the test split),
each trained for the same wall-clock budget on this machine, one after another, and prints a
markdown table: variant, settings, steps reached, step time, validation bits per byte (bits per
character of this corpus, whatever the tokenizer).

    python tools/train/search_defaults.py [--minutes 5] [--only NAME ...] [--out runs/search]

Every variant runs with the time-driven schedule (the cosine decay ends with the time), without
samples or periodic checkpoints, and is scored by the final evaluation on the whole validation
split. A shorter budget than the real 15 minutes favours smaller models a little; the winner is
then confirmed with the README's main command. Needs the release build (cargo build --release).
Waits for a quiet machine before each variant, since a busy core changes how many steps fit.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
from side_by_side import wait_quiet  # noqa: E402

# Each variant changes the defaults in the listed ways only. The default width follows the
# matrix kernels (dim 160 with AVX-512 ones, 128 otherwise), so one of the dim variants is the
# default itself on any machine.
VARIANTS = {
    "default": [],
    "bytes": ["train.tokenizer=bytes"],
    "bpe 512": ["train.tokenizer=bpe:512"],
    "bpe 2048": ["train.tokenizer=bpe:2048"],
    "bpe 8192": ["train.tokenizer=bpe:8192"],
    "lr 4e-3": ["train.lr=4e-3"],
    "lr 2e-3": ["train.lr=2e-3"],
    "min_lr 1e-5": ["train.min_lr=1e-5"],
    "batch 2": ["train.batch_size=2"],
    "batch 8": ["train.batch_size=8"],
    "dim 128": ["model.dim=128", "model.dim_head=32"],
    "dim 160": ["model.dim=160", "model.dim_head=40"],
    "dim 192": ["model.dim=192", "model.dim_head=48"],
    "dim 256": ["model.dim=256", "model.dim_head=64"],
    "depth 3": ["model.depth=3"],
    "depth 5": ["model.depth=5"],
    "window 32": ["model.local_attn_window_size=32"],
    "2 local heads": ["model.n_local_attn_heads=2"],
}


def run_variant(lat, name, settings, minutes, out):
    folder = os.path.join(out, name.replace(" ", "_"))
    shutil.rmtree(folder, ignore_errors=True)
    command = [lat, "train", "--out", folder, "--time-limit", f"{minutes}m", "--quiet",
               "--set", "train.sample_every=0", "--set", "train.checkpoint_every=0"]
    for s in settings:
        command += ["--set", s]
    start = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - start
    records = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    final = [r for r in records if r["kind"] == "validation"][-1]
    trains = [r for r in records if r["kind"] == "train"]
    steps = final["step"]
    last = trains[-1]
    return {"variant": name, "settings": " ".join(settings) or "(the defaults)", "steps": steps,
            "step_s": last["elapsed_s"] / max(last["step"], 1), "bpc": final["bpc"], "wall_s": wall,
            "bound": last.get("schedule_bound")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--only", nargs="*", help="variants to run (default: all)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "search"))
    p.add_argument("--lat", default=os.path.join(ROOT, "target", "release", "lat"))
    p.add_argument("--quiet-load", type=float, default=0.15)
    a = p.parse_args()
    names = a.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    rows = []
    for name in names:
        wait_quiet(a.quiet_load, 600)
        r = run_variant(a.lat, name, VARIANTS[name], a.minutes, a.out)
        print(json.dumps(r), flush=True)
        rows.append(r)
    print(f"\n| variant ({a.minutes:g} minutes each) | settings | steps | s/step | validation bpc |")
    print("|---|---|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: r["bpc"]):
        print(f"| {r['variant']} | `{r['settings']}` | {r['steps']} | {r['step_s']:.3f} | {r['bpc']:.4f} |")


if __name__ == "__main__":
    main()

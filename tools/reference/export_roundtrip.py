"""Checks `lat export` against the reference: models made here (one imported, one trained by
`lat train`, one reversible with rotary positions and a product-key memory) are exported as .pt
and as .safetensors, loaded by linear-attention-transformer with `load_state_dict(strict=True)`,
and must give the logits `lat logits` gives (max abs difference <= 1e-4).

    python tools/reference/export_roundtrip.py [--lat target/release/lat] [--write-fixture]

--write-fixture keeps the first case as the committed fixture of the export test:
tests/fixtures/checkpoints/export.pt (what `lat export` wrote) and export_reference.safetensors
(the logits the reference computes from it).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

from linear_attention_transformer import LinearAttentionTransformerLM, LinformerContextSettings, LinformerSettings
from linear_attention_transformer.autopadder import Autopadder

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def reference_kwargs(path):
    """The keyword arguments of an exported model, as Python passes them: JSON has no tuples,
    and the reference tells a per-layer tuple from a number by its type (a list would be taken
    for one value), and the Linformer settings are named tuples."""
    with open(path) as f:
        kwargs = json.load(f)
    for k in ("n_local_attn_heads", "pkm_layers"):
        if isinstance(kwargs.get(k), list):
            kwargs[k] = tuple(kwargs[k])
    for k, cls in (("linformer_settings", LinformerSettings), ("context_linformer_settings", LinformerContextSettings)):
        if kwargs.get(k) is not None:
            v = kwargs[k]
            kwargs[k] = cls(**v) if isinstance(v, dict) else cls(*v)
    return kwargs


def reference_logits(kwargs_path, state_dict, tokens):
    net = LinearAttentionTransformerLM(**reference_kwargs(kwargs_path)).eval()
    net.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        # `lat logits` pads lengths as the reference's Autopadder does.
        return Autopadder(net)(tokens)


def check(lat, name, model, num_tokens, work):
    tokens = torch.randint(0, num_tokens, (2, 24), generator=torch.Generator().manual_seed(5))
    save_file({"tokens": tokens}, os.path.join(work, "tokens.safetensors"))
    run(lat, "logits", "--model", model, "--tokens", os.path.join(work, "tokens.safetensors"), "--out", os.path.join(work, "ours.safetensors"))
    ours = load_file(os.path.join(work, "ours.safetensors"))["logits"]
    results = {}
    for ext, read in [("pt", lambda p: torch.load(p, weights_only=True)), ("safetensors", load_file)]:
        out = os.path.join(work, f"{name}.{ext}")
        run(lat, "export", "--model", model, "--out", out)
        theirs = reference_logits(os.path.join(work, f"{name}.json"), read(out), tokens)
        worst = (theirs - ours).abs().max().item()
        results[ext] = worst
        print(f"{name}: .{ext} loaded with strict=True; max abs logit difference {worst:.2e}")
        if worst > 1e-4:
            sys.exit(f"{name}: the reference's logits from the .{ext} export differ by {worst}")
    return tokens, results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lat", default=os.path.join(ROOT, "target", "release", "lat"))
    ap.add_argument("--write-fixture", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp()
    try:
        # 1. The checkpoint fixtures' model, imported from the reference's legacy file.
        imported = os.path.join(work, "imported.safetensors")
        ckpt = os.path.join(FIXTURES, "checkpoints")
        run(args.lat, "import", "--torch", os.path.join(ckpt, "legacy.pt"), "--config", os.path.join(ckpt, "model.json"), "--out", imported)
        tokens, _ = check(args.lat, "imported", imported, 48, work)
        if args.write_fixture:
            shutil.copy(os.path.join(work, "imported.pt"), os.path.join(ckpt, "export.pt"))
            theirs = reference_logits(os.path.join(work, "imported.json"), torch.load(os.path.join(ckpt, "export.pt"), weights_only=True), tokens)
            save_file({"tokens": tokens, "logits": theirs.contiguous()}, os.path.join(ckpt, "export_reference.safetensors"))
            print("wrote", os.path.join(ckpt, "export.pt"), "and export_reference.safetensors")
        # 2. A byte-level model trained here by `lat train`.
        run_dir = os.path.join(work, "run")
        run(args.lat, "train", "--out", run_dir, "--max-steps", "5", "--quiet", "--tokenizer", "bytes", "--set", "model.dim=32", "--set", "model.depth=2",
            "--set", "model.heads=2", "--set", "model.dim_head=16", "--set", "model.n_local_attn_heads=1", "--set", "train.batch_size=2", "--set", "train.seq_len=64",
            "--set", "train.eval_every=0", "--set", "train.sample_every=0", "--set", "train.eval_windows=1")
        check(args.lat, "trained", os.path.join(run_dir, "model.safetensors"), 256, work)
        # 3. Reversible with rotary positions, and with product-key memories and token shifting.
        for fixture in ["rotary_noncausal", "pkm_reversible_shift"]:
            kw = os.path.join(FIXTURES, fixture + ".json")
            other = os.path.join(work, fixture + ".safetensors")
            run(args.lat, "import", "--torch", os.path.join(FIXTURES, fixture + ".pt"), "--config", kw, "--out", other)
            with open(kw) as f:
                check(args.lat, fixture, other, json.load(f)["num_tokens"], work)
    finally:
        shutil.rmtree(work)
    print("export round trip: every case loads strictly and reproduces the logits")


if __name__ == "__main__":
    main()

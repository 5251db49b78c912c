"""The reference's side of `lat bench`: times linear-attention-transformer 0.19.1 on the same
configurations and prints the same JSON records.

    python tools/reference/bench.py --preset seed --mode forward|train|generate --seq-len N \
        [--batch B] [--steps K] [--warmup W] [--new-tokens 256] [--threads 2] \
        [--device cpu|cuda] [--precision f32|bf16] [--json]
    python tools/reference/bench.py --preset seed --seq-len N --export DIR   # state_dict + config for `lat import`

`train` is one step of zero_grad, forward, cross-entropy, backward and AdamW (as in
BASELINES.md); `generate` is AutoregressiveWrapper.generate from a prompt of --seq-len tokens, which
recomputes the whole sequence for every new token. The process's peak RSS is reported, and on a
GPU the peak of torch's allocations. `--precision bf16` runs under torch.autocast (bfloat16),
the usual mixed precision of PyTorch users.
"""

import argparse
import json
import math
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from linear_attention_transformer import LinearAttentionTransformerLM
from linear_attention_transformer.autoregressive_wrapper import AutoregressiveWrapper


def preset(name, seq_len):
    round_up = lambda n, unit: math.ceil(n / unit) * unit
    if name == "seed":
        return dict(num_tokens=256, dim=512, heads=8, dim_head=64, depth=6, causal=True, blindspot_size=64,
                    n_local_attn_heads=4, local_attn_window_size=128, reversible=True, ff_chunks=2,
                    max_seq_len=round_up(seq_len, 128))
    if name == "tiny":
        return dict(num_tokens=256, dim=128, heads=4, dim_head=32, depth=2, causal=True, n_local_attn_heads=2,
                    max_seq_len=round_up(seq_len, 128))
    raise SystemExit(f"unknown preset {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="seed")
    ap.add_argument("--config", help="JSON keyword arguments instead of a preset")
    ap.add_argument("--set", action="append", default=[], help="override a keyword argument, e.g. blindspot_size=1")
    ap.add_argument("--mode", choices=["forward", "train", "generate"], default="forward")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--export", help="write state_dict.pt and config.json of the model here and exit")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    extra = a.new_tokens if a.mode == "generate" else 0
    kw = json.load(open(a.config)) if a.config else preset(a.preset, a.seq_len + extra)
    for s in a.set:
        k, v = s.split("=", 1)
        kw[k] = json.loads(v)
    model = LinearAttentionTransformerLM(**kw).to(a.device)
    if a.export:
        os.makedirs(a.export, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(a.export, "state_dict.pt"))
        with open(os.path.join(a.export, "config.json"), "w") as f:
            json.dump(kw, f)
        return
    v = kw["num_tokens"]
    times = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0) if a.mode == "train" else None
    wrapper = AutoregressiveWrapper(model) if a.mode == "generate" else None
    gpu = a.device.startswith("cuda")
    autocast = torch.autocast(device_type="cuda" if gpu else "cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16")
    for i in range(a.warmup + a.steps):
        x = torch.randint(0, v, (a.batch, a.seq_len), device=a.device)
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if a.mode == "forward":
            model.eval()
            with torch.no_grad(), autocast:
                model(x)
        elif a.mode == "train":
            model.train()
            opt.zero_grad()
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, v), ((x + 1) % v).reshape(-1))
            loss.backward()
            opt.step()
        else:
            # Greedy, through the reference's own top-k filter with k = 1.
            wrapper.generate(x, a.new_tokens, filter_thres=1.0 - 1.0 / v, temperature=1.0)
        if gpu:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    produced = a.batch * (a.new_tokens if a.mode == "generate" else a.seq_len)
    record = {
        "mode": a.mode,
        "seq_len": a.seq_len,
        "batch": a.batch,
        "steps": a.steps,
        "median_s": med,
        "min_s": min(times),
        "tokens_per_s": produced / med,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": a.threads,
        "implementation": "reference",
        "device": a.device,
        "precision": a.precision,
    }
    if a.mode == "generate":
        # Every new token re-runs the whole sequence: the average is the per-token time.
        record["per_token_ms"] = med / a.new_tokens * 1000
    if gpu:
        record["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if a.json:
        print(json.dumps(record))
    else:
        print(f"{a.mode} seq_len {a.seq_len} batch {a.batch}: median {med:.4f} s ({produced / med:.0f} tokens/s), peak RSS {record['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()

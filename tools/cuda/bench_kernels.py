"""The Python side of `lat kernel-bench` on a GPU: times causal attention kernels forward and
forward+backward, with the same sizes and JSON records.

    python tools/cuda/bench_kernels.py --batch 1,4,8 --heads 8,16 --seq-len 4096,16384,65536 [--steps 10]

Implementations: flash-linear-attention's `chunk_linear_attn` (normalised causal linear
attention with an identity feature map: a different function from the reference's, timed for
throughput), the reference's own `causal_linear_attn` (blind-spot bucket 64, as the seed model
uses; it materialises one state per bucket and runs out of memory at the largest sizes), and
causal softmax attention through torch's SDPA (flash) as a yardstick. Sizes that do not fit are
reported with "error".
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, q, k, v, g, steps):
    fwd, both = [], []
    for i in range(steps + 2):
        for x in (q, k, v):
            x.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(q, k, v)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out.backward(g)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 2:
            fwd.append((t1 - t0) * 1e3)
            both.append((t2 - t0) * 1e3)
    return statistics.median(fwd), statistics.median(both)


def implementations():
    impls = {}
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        impls["fla.chunk_linear_attn"] = ("bthd", lambda q, k, v: chunk_linear_attn(q, k, v, normalize=True)[0])
    except Exception as e:  # reported, not fatal: the other rows still run
        print(json.dumps({"implementation": "fla.chunk_linear_attn", "error": f"import failed: {e}"}))
    try:
        from linear_attention_transformer.linear_attention_transformer import causal_linear_attn

        impls["reference.causal_linear_attn"] = ("bhtd", lambda q, k, v: causal_linear_attn(q, k, v, bucket_size=64))
    except Exception as e:
        print(json.dumps({"implementation": "reference.causal_linear_attn", "error": f"import failed: {e}"}))
    impls["torch.sdpa_causal"] = ("bhtd", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return impls


def main():
    ap = argparse.ArgumentParser()
    ints = lambda s: [int(x) for x in s.split(",")]
    ap.add_argument("--batch", type=ints, default=[1])
    ap.add_argument("--heads", type=ints, default=[8])
    ap.add_argument("--seq-len", type=ints, required=True)
    ap.add_argument("--dim-head", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    torch.manual_seed(0)
    impls = implementations()
    for b in a.batch:
        for h in a.heads:
            for n in a.seq_len:
                for name, (layout, fn) in impls.items():
                    shape = (b, n, h, a.dim_head) if layout == "bthd" else (b, h, n, a.dim_head)
                    record = {"implementation": name, "op": "CausalLinear", "batch": b, "heads": h, "seq_len": n,
                              "dim_head": a.dim_head, "precision": "bf16", "device": "cuda"}
                    try:
                        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                        g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                        record["forward_ms"], record["forward_backward_ms"] = timed(fn, q, k, v, g, a.steps)
                    except Exception as e:
                        record["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    finally:
                        q = k = v = g = None
                        torch.cuda.empty_cache()
                    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

"""Load benchmark of `lat serve` over loopback (bounded in requests and time).

For each model (the seed model and the default model, random weights of their shapes) and each
concurrency (1, 8, 32, 64 streams by default): that many clients stream completions of 256 new
tokens after prompts of 64 to 1024 tokens at once; reports aggregate tokens/s, p50/p99 time to
first token and inter-token latency, and the server's peak memory. A single stream is compared
with `lat generate` on the same prompt. Then a rough run: 500 requests from 64 clients, of which
10 % leave early and 5 % are malformed; every valid request must complete, the server must keep
serving, and its memory must come back.

    python tools/bench/serve_load.py [--lat target/release/lat] [--streams 1,8,32,64] [--out benchmarks/serve.json]

Needs httpx (installed with the openai package), numpy and safetensors (`pip install openai numpy
safetensors`). Prints a Markdown table.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SEED = ["train.tokenizer=bytes", "model.dim=512", "model.depth=6", "model.heads=8", "model.dim_head=64", "model.n_local_attn_heads=4", "model.local_attn_window_size=128",
        "model.blindspot_size=64", "model.reversible=true", "model.ff_chunks=2", "model.max_seq_len=1536"]
DEFAULT = ["model.max_seq_len=1536"]


def make_model(lat, work, name, settings):
    run = os.path.join(work, name)
    args = [lat, "train", "--out", run, "--max-steps", "1", "--quiet", "--set", "train.seq_len=128", "--set", "train.batch_size=1",
            "--set", "train.eval_every=0", "--set", "train.sample_every=0", "--set", "train.eval_windows=1"]
    for s in settings:
        args += ["--set", s]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(run, "model.safetensors")


def rss(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    def __init__(self, lat, model, slots):
        self.proc = subprocess.Popen([lat, "serve", "--model", model, "--port", "0", "--max-batch", str(slots), "--max-queue", "1024"], stdout=subprocess.PIPE, text=True)
        self.url = "http://" + self.proc.stdout.readline().split("http://")[1].split()[0]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


async def one_stream(client, url, prompt, new_tokens, seed, stamps):
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0.8, "seed": seed, "stream": True}
    start = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.status_code
        async for data in sse(r):
            if data == "[DONE]":
                break
            for c in json.loads(data)["choices"]:
                if c["text"]:
                    times.append(time.perf_counter())
                if c["finish_reason"]:
                    assert c["finish_reason"] == "length"
    stamps.append((start, times))


async def sse(response):
    """The data of each server-sent event (lines end only at CR or LF, as the format says)."""
    buffer = b""
    async for piece in response.aiter_bytes():
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:].decode()


async def load(url, streams, new_tokens, rng):
    stamps = []
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        prompts = [[rng.randrange(256) for _ in range(rng.randint(64, 1024))] for _ in range(streams)]
        t0 = time.perf_counter()
        await asyncio.gather(*(one_stream(client, url, p, new_tokens, i, stamps) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    ttft = [times[0] - start for start, times in stamps if times]
    itl = [b - a for _, times in stamps for a, b in zip(times, times[1:])]
    chunks = sum(len(times) for _, times in stamps)
    return {"streams": streams, "wall_s": wall, "tokens_per_s": streams * new_tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99), "text_chunks": chunks}, prompts[0]


def generate_rate(lat, model, prompt, new_tokens, work):
    # `lat generate` reads token prompts from safetensors; write one with the reference's library.
    from safetensors.numpy import save_file
    import numpy as np
    st = os.path.join(work, "prompt.safetensors")
    save_file({"tokens": np.array([prompt], dtype=np.int64)}, st)
    out = subprocess.run([lat, "generate", "--model", model, "--prompt-tokens", st, "--max-new", str(new_tokens), "--temperature", "0.8", "--seed", "0", "--json"], check=True, capture_output=True)
    return json.loads(out.stdout)["tokens_per_s"]


async def rough(url, requests=500, clients=64, rng=None):
    ok = bad = left = 0
    failures = []
    queue = list(range(requests))

    async def client_loop(client):
        nonlocal ok, bad, left
        while queue:
            i = queue.pop()
            kind = rng.random()
            prompt = [rng.randrange(256) for _ in range(rng.randint(8, 256))]
            if kind < 0.05:
                r = await client.post(url + "/v1/completions", content=rng.choice([b"{not json", b'{"prompt": []}', b'{"prompt": "a", "max_tokens": -5}', b'{"colour": 1}']))
                bad += r.status_code == 400
                if r.status_code != 400:
                    failures.append(f"malformed request {i}: {r.status_code}")
            elif kind < 0.15:
                async with client.stream("POST", url + "/v1/completions", json={"prompt": prompt, "max_tokens": 200, "stream": True}) as r:
                    n = 0
                    async for _ in sse(r):
                        n += 1
                        if n >= 3:
                            break
                left += 1
            else:
                r = await client.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 32, "seed": i}, timeout=600)
                v = r.json()
                good = r.status_code == 200 and v["choices"][0]["finish_reason"] == "length" and v["usage"]["completion_tokens"] == 32
                ok += good
                if not good:
                    failures.append(f"request {i}: {r.status_code} {v}")

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4), timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return {"requests": requests, "completed": ok, "malformed_refused": bad, "left_early": left, "failures": failures}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lat", default=os.path.join(ROOT, "target", "release", "lat"))
    ap.add_argument("--streams", default="1,8,32,64")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--models", default="seed,default")
    ap.add_argument("--out")
    args = ap.parse_args()
    rng = random.Random(0)
    work = tempfile.mkdtemp()
    results = {"cpu": subprocess.run([os.path.join(ROOT, "..", "shared", "tools", "cpu-report")], capture_output=True, text=True).stdout.strip() if os.path.exists(os.path.join(ROOT, "..", "shared", "tools", "cpu-report")) else "", "models": {}}
    for name in args.models.split(","):
        model = make_model(args.lat, work, name, SEED if name == "seed" else DEFAULT)
        rows = []
        for streams in [int(s) for s in args.streams.split(",")]:
            server = Server(args.lat, model, max(32, streams))
            base = rss(server.proc.pid, "VmRSS")
            row, first_prompt = asyncio.run(load(server.url, streams, args.new_tokens, rng))
            row["peak_rss_mib"] = rss(server.proc.pid, "VmHWM")
            row["baseline_rss_mib"] = base
            server.stop()
            if streams == 1:
                # The same completion whole (no per-token work for the client on this machine).
                server = Server(args.lat, model, 32)
                t0 = time.perf_counter()
                r = httpx.post(server.url + "/v1/completions", json={"prompt": first_prompt, "max_tokens": args.new_tokens, "temperature": 0.8, "seed": 0}, timeout=600)
                row["whole_tokens_per_s"] = r.json()["usage"]["completion_tokens"] / (time.perf_counter() - t0)
                server.stop()
                row["lat_generate_tokens_per_s"] = generate_rate(args.lat, model, first_prompt, args.new_tokens, work)
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        server = Server(args.lat, model, 32)
        before = rss(server.proc.pid, "VmRSS")
        chaos = asyncio.run(rough(server.url, rng=rng))
        time.sleep(1.0)
        chaos["rss_before_mib"], chaos["rss_after_mib"], chaos["peak_rss_mib"] = before, rss(server.proc.pid, "VmRSS"), rss(server.proc.pid, "VmHWM")
        still = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=60)
        chaos["serves_after"] = still.status_code == 200
        server.stop()
        print(name, "rough run", json.dumps(chaos), flush=True)
        results["models"][name] = {"load": rows, "rough": chaos}
    print("\n| model | streams | tokens/s | vs 1 stream | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results["models"].items():
        single = r["load"][0]["tokens_per_s"]
        for row in r["load"]:
            print(f"| {name} | {row['streams']} | {row['tokens_per_s']:.0f} | {row['tokens_per_s'] / single:.1f}x | {row['ttft_p50_s']:.2f} / {row['ttft_p99_s']:.2f} | {row['itl_p50_ms']:.1f} / {row['itl_p99_ms']:.1f} | {row['peak_rss_mib']:.0f} |")
        one = r["load"][0]
        if "lat_generate_tokens_per_s" in one:
            g = one["lat_generate_tokens_per_s"]
            print(f"| {name} | 1, not streamed | {one['whole_tokens_per_s']:.0f} | {one['whole_tokens_per_s'] / g:.2f}x lat generate | | | |")
            print(f"| {name} | lat generate | {g:.0f} | streamed {one['tokens_per_s'] / g:.2f}x | | | |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    bad = [f for r in results["models"].values() for f in r["rough"]["failures"]] + [n for n, r in results["models"].items() if not r["rough"]["serves_after"]]
    if bad:
        sys.exit(f"rough run failures: {bad[:5]}")


if __name__ == "__main__":
    main()

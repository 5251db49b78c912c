"""Runs `lat bench` and the Python reference (tools/reference/bench.py) side by side on this
machine and writes a dated markdown table of times, tokens/s, peak memory and ratios.

    python tools/bench/side_by_side.py [--lengths 1024 2048 4096 8192 16384] [--modes forward train train-kept]
        [--rounds 3] [--steps 3] [--threads 2] [--variant seed] [--variant blindspot1]
        [--isa avx2 native] [--generate] [--quantized] [--scaling [VARIANT ...]] [--resume LOG]
        [--out benchmarks/YYYY-MM-DD.md]

Both instruction sets are measured on whatever machine it runs on: `avx2` is a build of `lat`
without its `avx512` feature (gemm's AVX2 kernels; built into target/avx2 when missing) against
the reference restricted to AVX2 (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2);
`native` is the default build against the unrestricted reference, and runs where the CPU has
AVX-512 (by default only there). Each of our rows also gives the share of the machine's FMA
peak (measured by `lat bench`) that the step's matrix products sustain over the whole step.
--quantized adds per-token decoding of the seed model's weights in f32, bf16 and int8, at
batch 1 and 32, with peak memory (ours only: the reference has no recurrent decoding).

Each measurement is its own process (so that its peak RSS is its own), both implementations use
the same number of threads, the two alternate (which one goes first swaps every round), every
process warms up before it times, the script waits for a quiet machine (CPU busy share below
--quiet-load) before each measurement, and the table reports medians over the rounds. Every finished
measurement is printed as one line; --resume takes such output from an interrupted run and skips
what it already measured.

Needs the release build of `lat` (cargo build --release) and a Python with the pinned packages of
tools/reference/requirements.txt (--python).
"""

import argparse
import ast
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = {"seed": [], "blindspot1": ["blindspot_size=1"]}


def busy_fraction(seconds=2.0):
    """Share of CPU time spent busy over the next `seconds`, from /proc/stat (all cores)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v), idle
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(limit, max_wait):
    """Waits until the machine is idle apart from us (busy share below `limit`)."""
    start = time.time()
    while time.time() - start < max_wait:
        if busy_fraction() < limit:
            return True
        time.sleep(3)
    return False


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def avx2_build(path):
    """Our binary without gemm's AVX-512 kernels, brought up to date with the sources (a stale
    binary would measure old code)."""
    print("building the AVX2-only lat into target/avx2", flush=True)
    subprocess.run(["cargo", "build", "--release", "-p", "lat-cli", "--no-default-features", "--target-dir", os.path.join(ROOT, "target", "avx2")],
                   check=True, cwd=ROOT)
    return path


def run(cmd, env, timeout):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:160]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lat", default=os.path.join(ROOT, "target", "release", "lat"))
    ap.add_argument("--lat-avx2", default=os.path.join(ROOT, "target", "avx2", "release", "lat"), help="the AVX2-only build (brought up to date first)")
    ap.add_argument("--isa", nargs="+", choices=["avx2", "native"], help="instruction sets to measure (default: avx2, and native where the CPU has AVX-512)")
    ap.add_argument("--quantized", action="store_true", help="also per-token decoding with f32, bf16 and int8 weights at batch 1 and 32")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train", "train-kept"],
                    help="train-kept: our training step with the reversible stack keeping its activations (--keep-activations), against the reference's training step")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="model variants (default: seed and blindspot1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generate", action="store_true", help="also generation: 256 new tokens after 512, and per-token time at long contexts")
    ap.add_argument("--scaling", nargs="*", metavar="VARIANT", help="also 32k tokens (ours, and the reference if it can), for these variants (default: all)")
    ap.add_argument("--quiet-load", type=float, default=0.15, help="busy CPU share below which the machine counts as quiet")
    ap.add_argument("--max-wait", type=float, default=600)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--resume", help="output of an earlier, interrupted run: its measurements are reused")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", f"{datetime.date.today()}.md"))
    a = ap.parse_args()
    variants = a.variant or ["seed", "blindspot1"]
    flags = cpu_flags()
    isas = a.isa or (["avx2", "native"] if "avx512f" in flags else ["avx2"])

    base_env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    # What each instruction set runs: our binary, and the reference's environment.
    setups = {
        "avx2": (avx2_build(a.lat_avx2) if "avx2" in isas else None, dict(base_env, ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")),
        "native": (a.lat, base_env),
    }
    env = base_env
    ref = os.path.join(ROOT, "tools", "reference", "bench.py")
    rows = []
    noisy = 0
    done = load_resumed(a.resume) if a.resume else {}

    def measure(label, ours_cmd, ref_cmd, env):
        nonlocal noisy
        if label in done:
            rows.append((label, done[label]))
            print(label, "reused", flush=True)
            return
        results = {"ours": [], "ref": []}
        for r in range(a.rounds):
            order = [("ours", ours_cmd), ("ref", ref_cmd)]
            if r % 2:
                order.reverse()
            for who, cmd in order:
                if cmd is None:
                    continue
                if not wait_quiet(a.quiet_load, a.max_wait):
                    noisy += 1
                results[who].append(run(cmd, env, a.timeout))
        rows.append((label, results))
        summary = {k: summarize(v) for k, v in results.items()}
        print(label, json.dumps(summary), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for isa in isas:
            lat, env = setups[isa]
            for variant in variants:
                sets = VARIANTS[variant]
                lat_cfg = lambda n: config_for(a, tmp, variant, sets, n, base_env)
                def pair(mode, n, steps):
                    """Our command and the reference's for one configuration. train-kept: our
                    reversible stack keeps its activations; the reference has no such choice."""
                    cfg = lat_cfg(n)
                    common = ["--mode", "train" if mode == "train-kept" else mode, "--seq-len", str(n), "--steps", str(steps), "--json"]
                    ours = [lat, "bench", "--config", cfg] + common + (["--keep-activations"] if mode == "train-kept" else [])
                    return ours, [a.python, ref, "--config", cfg, "--threads", str(a.threads)] + common
                for mode in a.modes:
                    for n in a.lengths:
                        measure((isa, variant, mode, n), *pair(mode, n, a.steps), env)
                if a.scaling is not None and (not a.scaling or variant in a.scaling):
                    for mode in a.modes:
                        measure((isa, variant, mode, 32768), *pair(mode, 32768, 2), env)
            if a.generate:
                # The same weights for both: the reference's seed model, imported.
                for prompt, new in [(512, 256)]:
                    model = imported_model(a, tmp, prompt + new, base_env)
                    cfg = os.path.join(tmp, f"gen-{prompt + new}", "config.json")
                    common = ["--mode", "generate", "--seq-len", str(prompt), "--new-tokens", str(new), "--steps", "2", "--json"]
                    measure((isa, "seed", "generate", prompt), [lat, "bench", "--model", model] + common,
                            [a.python, ref, "--config", cfg, "--threads", str(a.threads)] + common, env)
                # Per-token time at long contexts: ours only beyond what the reference finishes in time.
                for context in [1024, 4096, 16384]:
                    model = imported_model(a, tmp, context + 64, base_env)
                    cfg = os.path.join(tmp, f"gen-{context + 64}", "config.json")
                    common = ["--mode", "generate", "--seq-len", str(context), "--new-tokens", "64", "--steps", "2", "--json"]
                    theirs = [a.python, ref, "--config", cfg, "--threads", str(a.threads), "--new-tokens", "8", "--steps", "1",
                              "--mode", "generate", "--seq-len", str(context), "--json"] if context <= 4096 else None
                    measure((isa, "seed", "decode", context), [lat, "bench", "--model", model] + common, theirs, env)
            if a.quantized:
                # The seed model's weights as f32, bf16 and int8; a prompt of 64, then 128 tokens.
                model = imported_model(a, tmp, 64 + 128, base_env)
                for q in ["f32", "bf16", "int8"]:
                    path = model if q == "f32" else os.path.join(tmp, f"seed-{q}.safetensors")
                    if not os.path.exists(path):
                        subprocess.run([lat, "quantize", "--model", model, "--to", q, "--out", path], check=True, env=base_env)
                    for batch in [1, 32]:
                        common = ["--mode", "generate", "--seq-len", "64", "--new-tokens", "128", "--batch", str(batch), "--steps", "2", "--json"]
                        measure((isa, q, "quantized", batch), [lat, "bench", "--model", path] + common, None, env)

    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(render(a, rows, noisy))
    print("wrote", a.out)


def load_resumed(path):
    """Measurements printed by an earlier run, `(isa, variant, mode, n) {summary json}` per line; each
    summary stands in for its runs (the median of one value is that value)."""
    done = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("(") or ") {" not in line:
                continue
            label, summary = line.split(") ", 1)
            parsed = json.loads(summary)
            done[ast.literal_eval(label + ")")] = {k: [v] if v.get("error") != "not run" else [] for k, v in parsed.items()}
    return done


def config_for(a, tmp, variant, sets, n, env):
    """The seed configuration at length n (as JSON for both sides), with the variant's changes."""
    path = os.path.join(tmp, f"{variant}-{n}.json")
    if not os.path.exists(path):
        out = os.path.join(tmp, f"export-{variant}-{n}")
        cmd = [a.python, os.path.join(ROOT, "tools", "reference", "bench.py"), "--preset", "seed", "--seq-len", str(n), "--export", out]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, env=env)
        os.replace(os.path.join(out, "config.json"), path)
    return path


def imported_model(a, tmp, length, env):
    """The reference's seed model of max_seq_len >= length, saved by torch and imported by lat."""
    out = os.path.join(tmp, f"gen-{length}")
    model = os.path.join(out, "model.safetensors")
    if not os.path.exists(model):
        subprocess.run([a.python, os.path.join(ROOT, "tools", "reference", "bench.py"), "--preset", "seed", "--seq-len", str(length), "--export", out], check=True, env=env)
        subprocess.run([a.lat, "import", "--torch", os.path.join(out, "state_dict.pt"), "--config", os.path.join(out, "config.json"), "--out", model], check=True, env=env)
    return model


def summarize(results):
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[0]["error"] if results else "not run"}
    summary = {
        key: statistics.median(r[key] for r in ok)
        for key in ["median_s", "tokens_per_s", "peak_rss_mib", "first_token_s", "per_token_ms", "product_gflops_per_s", "fma_peak_gflops_per_s"]
        if all(r.get(key) is not None for r in ok)
    }
    summary["runs"] = len(ok)
    return summary


def render(a, rows, noisy):
    flags = cpu_flags()
    shown = [f for f in ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16"] if f in flags]
    lines = [
        f"# Side-by-side benchmark, {datetime.date.today()}",
        "",
        f"`lat bench` against the Python reference (linear-attention-transformer 0.19.1, torch {torch_version(a)}) on the same",
        f"configurations, batch 1, {a.threads} threads each, on {cpu_name()} ({os.cpu_count()} cores visible; flags: {' '.join(shown) or 'none of note'}).",
        f"Medians of {a.rounds} alternating rounds, each a separate process timing "
        f"{a.steps} steps after a warm-up; peak memory is each process's peak RSS. Reproduce with",
        "",
        "    " + " ".join(["python", "tools/bench/side_by_side.py"] + sys.argv[1:]),
        "",
        "ISA `avx2`: our build without the `avx512` feature against the reference with `ATEN_CPU_CAPABILITY=avx2",
        "MKL_ENABLE_INSTRUCTIONS=AVX2`; `native`: the default build against the unrestricted reference.",
        "",
    ]
    if noisy:
        lines += [f"Note: {noisy} measurements started on a busy machine (CPU more than {a.quiet_load:.0%} busy) after waiting {a.max_wait:.0f} s.", ""]
    lines += [
        "| ISA | model | mode | tokens | ours s | reference s | speed ratio | ours tokens/s | reference tokens/s | ours % of FMA peak | ours peak MiB | reference peak MiB | memory ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peaks = {}  # the FMA peak each instruction set's rows measured
    for (isa, variant, mode, n), results in rows:
        if mode in ("decode", "quantized"):
            continue
        o, r = summarize(results["ours"]), summarize(results["ref"]) if results["ref"] else {"error": "not run"}
        def cell(s, key, fmt):
            return fmt.format(s[key]) if key in s else s.get("error", "")
        speed = f"{o['tokens_per_s'] / r['tokens_per_s']:.2f}x" if "tokens_per_s" in o and "tokens_per_s" in r else ""
        mem = f"{o['peak_rss_mib'] / r['peak_rss_mib']:.2f}x" if "peak_rss_mib" in o and "peak_rss_mib" in r else ""
        peak = f"{100 * o['product_gflops_per_s'] / o['fma_peak_gflops_per_s']:.0f} %" if o.get("fma_peak_gflops_per_s") and mode != "generate" else ""
        if o.get("fma_peak_gflops_per_s"):
            peaks.setdefault(isa, []).append(o["fma_peak_gflops_per_s"])
        lines.append(
            f"| {isa} | {variant} | {mode} | {n} | {cell(o, 'median_s', '{:.3f}')} | {cell(r, 'median_s', '{:.3f}')} | {speed} | "
            f"{cell(o, 'tokens_per_s', '{:.0f}')} | {cell(r, 'tokens_per_s', '{:.0f}')} | {peak} | {cell(o, 'peak_rss_mib', '{:.0f}')} | "
            f"{cell(r, 'peak_rss_mib', '{:.0f}')} | {mem} |"
        )
    decoding = [(isa, n, summarize(res["ours"]), summarize(res["ref"])) for (isa, _, mode, n), res in rows if mode == "decode"]
    if decoding:
        lines += [
            "",
            "Decoding after a context of n tokens: our time to the first new token (reading the context in one pass) and",
            "per token after it; the reference's per token (each of its tokens re-runs the whole sequence).",
            "",
            "| ISA | context | ours first token s | ours ms/token | reference ms/token | per-token ratio |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for isa, n, o, r in decoding:
            ours = o.get("per_token_ms")
            ref = r.get("per_token_ms")
            lines.append(
                f"| {isa} | {n} | {o.get('first_token_s', float('nan')):.3f} | {ours if ours is not None else float('nan'):.1f} | "
                f"{f'{ref:.0f}' if ref is not None else 'not run'} | {f'{ref / ours:.0f}x' if ours and ref else ''} |"
            )
    quantized = {(isa, q, b): summarize(res["ours"]) for (isa, q, mode, b), res in rows if mode == "quantized"}
    if quantized:
        lines += [
            "",
            "Quantized decoding: the seed model's weights in f32, bf16 and int8 (`lat quantize`), a prompt of 64 tokens, then",
            "128 new tokens per stream; per-token time of one decoding step for the whole batch, its speed-up over f32 at the",
            "same batch, the step's cost over a single stream's with the same weights, and the process's peak memory.",
            "",
            "| ISA | weights | streams | ms/step | tokens/s | speed-up over f32 | step / single-stream step | peak MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for (isa, q, b), o in quantized.items():
            ms = o.get("per_token_ms")
            f32 = quantized.get((isa, "f32", b), {}).get("per_token_ms")
            single = quantized.get((isa, q, 1), {}).get("per_token_ms")
            if ms is None:
                lines.append(f"| {isa} | {q} | {b} | {o.get('error', '')} | | | | |")
                continue
            lines.append(
                f"| {isa} | {q} | {b} | {ms:.2f} | {b * 1e3 / ms:.0f} | {f'{f32 / ms:.2f}x' if f32 else ''} | "
                f"{f'{ms / single:.1f}x' if single else ''} | {o.get('peak_rss_mib', float('nan')):.0f} |"
            )
    lines += [
        "",
        "Speed ratio = our tokens/s / the reference's (above 1: we are faster). Memory ratio = our peak / the reference's peak.",
        "% of FMA peak = the FLOPs of the step's matrix products (2 per weight per token; a training step three times that, four",
        "with the reversible stack's recomputation) over the step's time, as a share of the f32 FMA peak that `lat bench`",
        "measures on the same threads, with the row's instruction set"
        + (f" ({', '.join(f'{isa}: {statistics.median(v):.0f} GFLOP/s' for isa, v in peaks.items())} here)." if peaks else "."),
        "For generate, tokens are new tokens (greedy), and the time includes reading the prompt. `decode` rows continue a context",
        "of that many tokens: ours for 64 new tokens, the reference for 8 (each of its tokens re-runs the whole sequence, so its",
        "rate does not depend on how many), and the reference not beyond 4 k tokens.",
        "`train-kept` rows: our training step with `--keep-activations` (the reversible stack keeps every block's activations",
        "instead of recomputing them in the backward pass, three passes' products instead of four) against the reference's",
        "training step, which always recomputes.",
        "",
    ]
    return "\n".join(lines)


def cpu_name():
    """The CPU's model name with its family and model numbers (which tell generations apart)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def torch_version(a):
    try:
        return subprocess.run([a.python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()

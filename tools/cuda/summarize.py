"""Summarises a check run's results folder (tools/cuda/check.sh) as Markdown: the correctness
checks, the model side by side with the reference (ratio = reference time / lat time, above 1
means lat is faster), and the kernels side by side."""

import json
import os
import sys


def records(path):
    out = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def checks(folder):
    lines = []
    for name in ("check-gpu.txt", "check-cpu.txt"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            text = open(path).read().splitlines()
            ok = sum(l.startswith("ok") for l in text)
            bad = [l for l in text if l.startswith("FAIL")]
            lines.append(f"- {name}: {ok} passed, {len(bad)} failed")
            lines += [f"  - {l}" for l in bad]
    failures = os.path.join(folder, "failures.txt")
    if os.path.exists(failures):
        lines += [f"- {l.strip()}" for l in open(failures)]
    return lines


def model(folder):
    rs = records(os.path.join(folder, "model.jsonl"))
    key = lambda r: (r["mode"], r.get("precision", "f32"), r["seq_len"])
    ours = {key(r): r for r in rs if r.get("implementation") != "reference"}
    ref = {key(r): r for r in rs if r.get("implementation") == "reference"}
    if not ours and not ref:
        return []
    lines = ["| mode | precision | T | lat s | reference s | ratio | reference peak GPU MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for k in sorted(set(ours) | set(ref)):
        a, b = ours.get(k), ref.get(k)
        ta = f"{a['median_s']:.4f}" if a else "-"
        tb = f"{b['median_s']:.4f}" if b else "-"
        ratio = f"{b['median_s'] / a['median_s']:.2f}x" if a and b else "-"
        mem = f"{b.get('peak_gpu_mib', 0):.0f}" if b and "peak_gpu_mib" in b else "-"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {ta} | {tb} | {ratio} | {mem} |")
    return lines


def kernels(folder):
    rs = [r for r in records(os.path.join(folder, "kernels.jsonl")) if "batch" in r]
    if not rs:
        return []
    names = sorted({r["implementation"] for r in rs}, key=lambda n: (n != "lat", n))
    sizes = sorted({(r["batch"], r["heads"], r["seq_len"]) for r in rs})
    cell = {(r["implementation"], r["batch"], r["heads"], r["seq_len"]): r for r in rs}
    head = "| B | H | T | " + " | ".join(f"{n} fwd+bwd ms" for n in names) + " | fla / lat |"
    lines = [head, "|" + "---:|" * (3 + len(names) + 1)]
    for b, h, t in sizes:
        row = [str(b), str(h), str(t)]
        for n in names:
            r = cell.get((n, b, h, t))
            row.append(f"{r['forward_backward_ms']:.2f}" if r and "forward_backward_ms" in r else ("error" if r else "-"))
        ours, fla = cell.get(("lat", b, h, t)), cell.get(("fla.chunk_linear_attn", b, h, t))
        ok = ours and fla and "forward_backward_ms" in ours and "forward_backward_ms" in fla
        row.append(f"{fla['forward_backward_ms'] / ours['forward_backward_ms']:.2f}x" if ok else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "results"
    out = ["# GPU check results", ""]
    gpu = os.path.join(folder, "gpu.txt")
    if os.path.exists(gpu):
        out += ["```", open(gpu).read().strip(), "```", ""]
    out += ["## Correctness", ""] + (checks(folder) or ["- no checks ran"]) + [""]
    m = model(folder)
    if m:
        out += ["## Seed model, batch 1 (ratio = reference / lat)", ""] + m + [""]
    k = kernels(folder)
    if k:
        out += ["## Causal linear attention kernels, head dim 64", ""] + k + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Helpers of benches/gpu_check.sh, standard library only (the GPU machine
and CI need nothing installed):

    gpu_report.py compare REFERENCE.safetensors OTHER.safetensors [--rtol 1e-3]
        max |a - b| over every tensor, relative to the reference's largest
        entry; exit 1 when above --rtol.
    gpu_report.py add OUT_DIR RUNNER ROWS.json
        appends the rows of one bench run to OUT_DIR/bench.json, tagged.
    gpu_report.py summary OUT_DIR
        OUT_DIR/bench.json (rows of `metagrad bench train --json` and
        benches/pytorch_train.py --json, each tagged with its "runner") and
        OUT_DIR/smi.csv (nvidia-smi samples) into a Markdown table: it/s,
        ratio to PyTorch on the same workload and mode, GPU utilisation in
        each row's timed window, first (cold) meta-iteration, peak memory.
"""
import json
import math
import struct
import sys
from array import array

DTYPES = {"F32": "f", "F64": "d", "I64": "q", "I32": "i"}


def read_safetensors(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        data = fh.read()
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        values = array(DTYPES[meta["dtype"]])
        values.frombytes(data[start:end])
        if sys.byteorder != "little":
            values.byteswap()
        tensors[name] = values
    return tensors


def compare(reference, other, rtol):
    ref, oth = read_safetensors(reference), read_safetensors(other)
    missing = sorted(set(ref) ^ set(oth))
    if missing:
        print(f"tensors in one file only: {', '.join(missing)}")
        return 1
    names = [n for n in ref if n != "query_loss"]
    scale = max(max((abs(v) for v in ref[n]), default=0.0) for n in names)
    worst, where = 0.0, ""
    for n in names:
        d = max((abs(a - b) if math.isfinite(b) else math.inf for a, b in zip(ref[n], oth[n])), default=0.0)
        if d > worst or math.isnan(d):
            worst, where = d, n
    rel = worst / scale if scale > 0 else worst
    verdict = "ok" if rel <= rtol else f"DIFFERS (tolerance {rtol:g})"
    print(f"max |gpu - cpu| = {worst:.3e} ({where}), largest entry {scale:.3e}, relative {rel:.2e}: {verdict}")
    return 0 if rel <= rtol else 1


def utilisation(samples, start, end):
    window = [u for t, u in samples if start <= t <= end]
    return (sum(window) / len(window), len(window)) if window else (None, 0)


def read_smi(path):
    """nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits"""
    from datetime import datetime
    samples = []
    try:
        with open(path) as fh:
            for line in fh:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) < 2:
                    continue
                try:
                    t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    samples.append((t, float(parts[1])))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return samples


def summary(out_dir):
    rows = json.load(open(f"{out_dir}/bench.json"))
    samples = read_smi(f"{out_dir}/smi.csv")
    torch = {(r["workload"], r["mode"]): r for r in rows if r["runner"].startswith("pytorch")}
    head = ("| workload | mode | runner | tasks | queries | r | meta-it/s | × PyTorch | GPU busy | first meta-it (s) | peak MiB |\n"
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        base = torch.get((r["workload"].split(" (")[0], r["mode"]))
        ratio = f"{r['meta_iterations_per_second'] / base['meta_iterations_per_second']:.2f}" if base and not r["runner"].startswith("pytorch") else ""
        end = r.get("finished_unix_s", 0)
        util, n = utilisation(samples, end - r.get("timed_s", 0), end)
        busy = f"{util:.0f} % ({n})" if util is not None else "n/a"
        peak = r.get("peak_memory_mib")
        lines.append(f"| {r['workload']} | {r['mode']} | {r['runner']} | {r['meta_batch']} | {r.get('queries', '')} | {r['inner_steps']} | "
                     f"{r['meta_iterations_per_second']:.3f} | {ratio} | {busy} | {r.get('first_iteration_s') or 0:.1f} | "
                     f"{'n/a' if peak is None else f'{peak:.0f}'} |")
    text = "\n".join(lines) + "\n\nGPU busy: mean of nvidia-smi's utilization.gpu over the row's timed meta-iterations (samples in brackets).\n"
    open(f"{out_dir}/summary.md", "w").write(text)
    print(text)
    return 0


def add(out_dir, runner, path):
    merged = f"{out_dir}/bench.json"
    try:
        rows = json.load(open(merged))
    except FileNotFoundError:
        rows = []
    try:
        new = json.load(open(path))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"no rows from {runner}: {e}")
        return 1
    rows += [dict(r, runner=runner) for r in new]
    json.dump(rows, open(merged, "w"), indent=1)
    return 0


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "add":
        return add(*sys.argv[2:])
    if len(sys.argv) >= 4 and sys.argv[1] == "compare":
        rtol = float(sys.argv[sys.argv.index("--rtol") + 1]) if "--rtol" in sys.argv else 1e-3
        return compare(sys.argv[2], sys.argv[3], rtol)
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        return summary(sys.argv[2])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())

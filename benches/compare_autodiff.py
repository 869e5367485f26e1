#!/usr/bin/env python3
"""Run `metagrad bench autodiff` on the CPU and the PyTorch reference on the
same shapes, and print PyTorch's time over ours per operation (>1: we are faster).

    python3 benches/compare_autodiff.py [--metagrad target/release/metagrad] [--backend cpu]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--metagrad", default="metagrad")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours_path, theirs_path = os.path.join(tmp, "ours.json"), os.path.join(tmp, "torch.json")
        subprocess.run([args.metagrad, "bench", "autodiff", "--backend", args.backend,
                        "--iters", str(args.iters), "--json", ours_path], check=True)
        subprocess.run([sys.executable, os.path.join(here, "pytorch_autodiff.py"), "--threads", str(args.threads),
                        "--iters", str(args.iters), "--json", theirs_path], check=True)
        ours = {(r["workload"], r["operation"]): r for r in json.load(open(ours_path))}
        theirs = {(r["workload"], r["operation"]): r for r in json.load(open(theirs_path))}
    print(f"\n{'workload':<42} {'operation':<26} {'metagrad ms':>12} {'pytorch ms':>11} {'pytorch/ours':>13}")
    for key, r in ours.items():
        t = theirs.get(key)
        if t:
            print(f"{key[0]:<42} {key[1]:<26} {r['ms_median']:>12.2f} {t['ms_median']:>11.2f} {t['ms_median'] / r['ms_median']:>13.2f}")


if __name__ == "__main__":
    main()

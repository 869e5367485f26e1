#!/usr/bin/env python3
"""Side by side with PyTorch: first checks that both compute the same
hypergradient on identical inputs (`metagrad init`, `metagrad export-episode`,
`metagrad hypergrad`, then the same in PyTorch, float64: maml, fomaml and
head-only maml against ANIL), then runs `metagrad
bench train` and benches/pytorch_train.py on the same workloads and prints
the ratio of meta-iterations per second (>1: metagrad is faster) and each
one's peak memory above the start of the case.

    pip install torch numpy safetensors
    python3 benches/compare_train.py --metagrad target/release/metagrad [--backend cpu] [--device cpu]
    python3 benches/compare_train.py --metagrad target/release/metagrad --modes maml --workloads omniglot-5w1s --inner-steps 1,5,10
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from pytorch_autodiff import loss_fn  # noqa: E402
from pytorch_train import adapt, head_only_query_loss  # noqa: E402

NAMES = [f"{layer}.{kind}" for i in range(1, 5) for layer, kind in
         [(f"conv{i}", "weight"), (f"conv{i}", "bias"), (f"bn{i}", "weight"), (f"bn{i}", "bias")]] + ["head.weight", "head.bias"]


def check_hypergradients(metagrad, tmp, backend):
    p, e = os.path.join(tmp, "p.safetensors"), os.path.join(tmp, "e.safetensors")
    subprocess.run([metagrad, "init", "--dataset", "omniglot", "--way", "5", "--seed", "1", "--out", p], check=True)
    subprocess.run([metagrad, "export-episode", "--dataset", "synthetic", "--way", "5", "--shot", "1",
                    "--queries", "15", "--seed", "3", "--out", e], check=True)
    params = load_file(p)
    ep = {k: v for k, v in load_file(e).items()}
    theta = [params[n].double().requires_grad_() for n in NAMES]
    xs, ys, xq, yq = ep["support_x"].double(), ep["support_y"], ep["query_x"].double(), ep["query_y"]
    worst = 0.0
    for mode, steps in [("maml", 3), ("fomaml", 3), ("maml-head", 3)]:
        g_path = os.path.join(tmp, f"g-{mode}.safetensors")
        head = ["--inner-params", "head"] if mode.endswith("-head") else []
        subprocess.run([metagrad, "hypergrad", "--params", p, "--episode", e, "--mode", mode.removesuffix("-head"), "--inner-steps", str(steps),
                        "--inner-lr", "0.4", "--backend", backend, "--out", g_path] + head, check=True, capture_output=True)
        ours = load_file(g_path)
        if mode == "maml-head":
            theirs = torch.autograd.grad(head_only_query_loss(theta, xs, ys, xq, yq, steps, 0.4, True), theta)
        elif mode == "maml":
            fast = adapt(theta, xs, ys, steps, 0.4, True)
            theirs = torch.autograd.grad(loss_fn(fast, xq, yq), theta)
        else:
            fast = [f.detach().requires_grad_() for f in adapt(theta, xs, ys, steps, 0.4, False)]
            theirs = torch.autograd.grad(loss_fn(fast, xq, yq), fast)
        scale = max(t.abs().max().item() for t in theirs)
        err = max((ours[n].double() - t).abs().max().item() for n, t in zip(NAMES, theirs))
        worst = max(worst, err / scale)
        print(f"hypergradient {mode} r={steps}: max |metagrad - pytorch| = {err:.3e} (largest entry {scale:.3e})")
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--metagrad", default="metagrad")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default="maml,fomaml")
    ap.add_argument("--workloads", default="", help="omniglot-5w1s, omniglot-20w1s, mini-imagenet-5w1s (default: all)")
    ap.add_argument("--inner-steps", default="", help="comma-separated r grid (default: each workload's own)")
    ap.add_argument("--queries", type=int, default=0, help="query images per class (default: each workload's own)")
    ap.add_argument("--meta-batch", type=int, default=0, help="tasks per meta-batch (default: each workload's own)")
    ap.add_argument("--kernels", default="native", help="metagrad's Conv-4 kernels, comma-separated: native, burn (Burn's generic operations)")
    args = ap.parse_args()
    selection = ((["--workloads", args.workloads] if args.workloads else []) + (["--inner-steps", args.inner_steps] if args.inner_steps else [])
                 + (["--queries", str(args.queries)] if args.queries else []) + (["--meta-batch", str(args.meta_batch)] if args.meta_batch else []))
    with tempfile.TemporaryDirectory() as tmp:
        worst = check_hypergradients(args.metagrad, tmp, args.backend)
        if worst > 1e-4:
            sys.exit(f"the hypergradients differ (relative {worst:.2e}): the timings below would not compare like with like")
        ours_path, theirs_path = os.path.join(tmp, "ours.json"), os.path.join(tmp, "torch.json")
        subprocess.run([args.metagrad, "bench", "train", "--backend", args.backend, "--steps", str(args.steps),
                        "--modes", args.modes, "--kernels", args.kernels, "--json", ours_path] + selection, check=True)
        subprocess.run([sys.executable, os.path.join(here, "pytorch_train.py"), "--device", args.device,
                        "--threads", str(args.threads), "--steps", str(args.steps), "--modes", args.modes,
                        "--json", theirs_path] + selection, check=True)
        key = lambda r: (r["workload"], r["mode"], r["inner_steps"], r.get("queries"))  # noqa: E731
        ours = json.load(open(ours_path))
        theirs = {key(r): r for r in json.load(open(theirs_path))}
    print(f"\n{'workload':<28} {'mode':<7} {'r':>3} {'queries':>7} {'kernels':>7} {'metagrad it/s':>14} {'pytorch it/s':>13} {'ours/pytorch':>13}"
          f" {'metagrad MiB':>13} {'pytorch MiB':>12}")
    mib = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    for r in ours:
        k, t = key(r), theirs.get(key(r))
        if t:
            ratio = r["meta_iterations_per_second"] / t["meta_iterations_per_second"]
            print(f"{k[0]:<28} {k[1]:<7} {k[2]:>3} {k[3] or '':>7} {r.get('kernels', 'native'):>7} {r['meta_iterations_per_second']:>14.3f}"
                  f" {t['meta_iterations_per_second']:>13.3f} {ratio:>13.2f} {mib(r.get('peak_memory_mib')):>13} {mib(t.get('peak_memory_mib')):>12}")


if __name__ == "__main__":
    main()

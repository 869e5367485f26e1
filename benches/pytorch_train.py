#!/usr/bin/env python3
"""PyTorch reference for `metagrad bench train`: the same Conv-4, workloads
(shapes, meta-batch, inner steps, step sizes) and modes, trained with plain
autograd the way learn2learn and higher do it: MAML by unrolling the inner
loop with create_graph=True, FO-MAML without it, Adam (eps 1e-8) on the
initialisation. Random images; reports meta-iterations per second and peak
memory.

    pip install torch numpy safetensors
    python3 benches/pytorch_train.py --device cpu --threads 2 --json torch-train.json
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from pytorch_autodiff import conv4_params, loss_fn

# (name, channels in, image size, conv width, features, way, queries, meta-batch, inner steps, inner lr)
WORKLOADS = [
    ("omniglot 5-way 1-shot", 1, 28, 64, 64, 5, 15, 32, 1, 0.4),
    ("omniglot 20-way 1-shot", 1, 28, 64, 64, 20, 5, 16, 5, 0.1),
    ("mini-imagenet 5-way 1-shot", 3, 84, 32, 800, 5, 15, 4, 5, 0.01),
]


def adapt(params, xs, ys, steps, lr, second_order):
    fast = params
    for _ in range(steps):
        g = torch.autograd.grad(loss_fn(fast, xs, ys), fast, create_graph=second_order)
        fast = [p - lr * gi for p, gi in zip(fast, g)]
    return fast


def meta_iteration(params, opt, tasks, steps, lr, second_order):
    opt.zero_grad()
    for xs, ys, xq, yq in tasks:
        fast = adapt(params, xs, ys, steps, lr, second_order)
        if not second_order:
            # First-order: the query gradient at the adapted weights, applied to θ.
            fast = [f.detach().requires_grad_() for f in fast]
            g = torch.autograd.grad(loss_fn(fast, xq, yq), fast)
            for p, gi in zip(params, g):
                p.grad = gi / len(tasks) if p.grad is None else p.grad + gi / len(tasks)
        else:
            (loss_fn(fast, xq, yq) / len(tasks)).backward()
    opt.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default="maml,fomaml")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, c, s, ch, feat, way, nq, batch, steps, lr in WORKLOADS:
        for mode in args.modes.split(","):
            params = [p.detach().to(dev).requires_grad_() for p in conv4_params(c, ch, feat, way, gen)]
            opt = torch.optim.Adam(params, lr=1e-3, eps=1e-8)
            tasks = [(torch.rand(way, c, s, s, generator=gen).to(dev), torch.arange(way).to(dev),
                      torch.rand(way * nq, c, s, s, generator=gen).to(dev), (torch.arange(way * nq) % way).to(dev))
                     for _ in range(batch)]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(args.steps + 1):
                start = time.perf_counter()
                meta_iteration(params, opt, tasks, steps, lr, mode == "maml")
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i > 0:  # the first iteration is warm-up
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            rows.append({"workload": name, "mode": mode, "meta_batch": batch, "inner_steps": steps,
                         "backend": f"pytorch {torch.__version__} {args.device}",
                         "meta_iterations_per_second": 1 / seconds, "seconds_per_meta_iteration": seconds,
                         "peak_mib": peak})
            print(f"{name:<28} {mode:<7} {1 / seconds:>8.3f} meta-it/s  {seconds:>8.2f} s  peak {peak:>8.0f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

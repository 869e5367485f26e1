#!/usr/bin/env python3
"""PyTorch reference for `metagrad bench train`: the same Conv-4, workloads
(shapes, meta-batch, inner steps, step sizes) and modes, trained with plain
autograd the way learn2learn and higher do it: MAML by unrolling the inner
loop with create_graph=True, FO-MAML without it, Adam (eps 1e-8) on the
initialisation; `maml-head` and `fomaml-head` adapt only the linear head on
features computed once per task (ANIL, as learn2learn's example). Random images; reports meta-iterations per second and the
peak memory of each case above its start (on the CPU the process high-water
mark, VmHWM, reset before each case as metagrad does; on CUDA the caching
allocator's peak).

    pip install torch numpy safetensors
    python3 benches/pytorch_train.py --device cpu --threads 2 --json torch-train.json
    python3 benches/pytorch_train.py --workloads omniglot-5w1s --modes maml --inner-steps 1,5,10
    python3 benches/pytorch_train.py --workloads omniglot-5w1s --modes maml,maml-head --queries 1
"""
import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pytorch_autodiff import conv4_params, features, loss_fn

# (key, name, channels in, image size, conv width, features, way, queries, meta-batch, inner steps, inner lr)
WORKLOADS = [
    ("omniglot-5w1s", "omniglot 5-way 1-shot", 1, 28, 64, 64, 5, 15, 32, 1, 0.4),
    ("omniglot-20w1s", "omniglot 20-way 1-shot", 1, 28, 64, 64, 20, 5, 16, 5, 0.1),
    ("mini-imagenet-5w1s", "mini-imagenet 5-way 1-shot", 3, 84, 32, 800, 5, 15, 4, 5, 0.01),
]


def proc_status_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return float(line.split()[1])
    return None


def start_memory(dev):
    """Baseline for a case's peak: CUDA's allocator, or the process RSS with VmHWM reset."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return proc_status_kib("VmRSS:") / 1024


def peak_memory(dev, baseline):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20 - baseline
    return proc_status_kib("VmHWM:") / 1024 - baseline


def adapt(params, xs, ys, steps, lr, second_order):
    fast = params
    for _ in range(steps):
        g = torch.autograd.grad(loss_fn(fast, xs, ys), fast, create_graph=second_order)
        fast = [p - lr * gi for p, gi in zip(fast, g)]
    return fast


def head_only_query_loss(params, xs, ys, xq, yq, steps, lr, second_order):
    """ANIL as learn2learn runs it: the trunk's features once, the inner loop
    on the linear head alone, the query loss differentiable in every parameter."""
    fs, fq = features(params[:16], xs), features(params[:16], xq)
    head = params[16:]
    for _ in range(steps):
        g = torch.autograd.grad(F.cross_entropy(F.linear(fs, *head), ys), head, create_graph=second_order)
        head = [p - lr * gi for p, gi in zip(head, g)]
    return F.cross_entropy(F.linear(fq, *head), yq)


def meta_iteration(params, opt, tasks, steps, lr, second_order, head_only=False):
    opt.zero_grad()
    for xs, ys, xq, yq in tasks:
        if head_only:
            (head_only_query_loss(params, xs, ys, xq, yq, steps, lr, second_order) / len(tasks)).backward()
            continue
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
    ap.add_argument("--workloads", default="", help="comma-separated keys (default: all)")
    ap.add_argument("--inner-steps", default="", help="comma-separated r grid (default: each workload's own)")
    ap.add_argument("--meta-batch", type=int, default=0, help="tasks per meta-batch (default: each workload's own)")
    ap.add_argument("--queries", type=int, default=0, help="query images per class (default: each workload's own)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    chosen = [k for k in args.workloads.split(",") if k]
    grid = [int(r) for r in args.inner_steps.split(",") if r]
    for key, name, c, s, ch, feat, way, nq, batch, own_steps, lr in WORKLOADS:
        if chosen and key not in chosen:
            continue
        batch = args.meta_batch or batch
        nq = args.queries or nq
        for mode in args.modes.split(","):
            for steps in grid or [own_steps]:
                params = [p.detach().to(dev).requires_grad_() for p in conv4_params(c, ch, feat, way, gen)]
                opt = torch.optim.Adam(params, lr=1e-3, eps=1e-8)
                tasks = [(torch.rand(way, c, s, s, generator=gen).to(dev), torch.arange(way).to(dev),
                          torch.rand(way * nq, c, s, s, generator=gen).to(dev), (torch.arange(way * nq) % way).to(dev))
                         for _ in range(batch)]
                baseline = start_memory(dev)
                times = []
                first = None
                for i in range(args.steps + 1):
                    start = time.perf_counter()
                    meta_iteration(params, opt, tasks, steps, lr, mode.removesuffix("-head") == "maml", mode.endswith("-head"))
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    if i > 0:  # the first iteration is warm-up
                        times.append(time.perf_counter() - start)
                    else:
                        first = time.perf_counter() - start
                seconds = statistics.median(times)
                peak = peak_memory(dev, baseline)
                rows.append({"workload": name, "mode": mode, "meta_batch": batch, "queries": nq, "inner_steps": steps,
                             "backend": f"pytorch {torch.__version__} {args.device}",
                             "meta_iterations_per_second": 1 / seconds, "seconds_per_meta_iteration": seconds,
                             "peak_memory_mib": peak, "first_iteration_s": first,
                             # The timed window, to read GPU utilisation sampled beside the run.
                             "timed_s": sum(times), "finished_unix_s": time.time()})
                print(f"{name:<28} {mode:<7} r={steps:<3} {1 / seconds:>8.3f} meta-it/s  {seconds:>8.2f} s  peak {peak:>8.0f} MiB",
                      flush=True)
                del params, opt, tasks
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

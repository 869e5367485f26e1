#!/usr/bin/env python3
"""PyTorch reference for `metagrad bench autodiff`: the same Conv-4, task shapes
and operations (gradient, Hessian-vector product, one exact MAML step with
inner step 0.4), timed on the CPU with plain autograd and create_graph.

    pip install torch numpy
    python3 benches/pytorch_autodiff.py --threads 2 --json torch.json
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def conv4_params(in_channels, channels, features, way, gen):
    params = []
    c_in = in_channels
    for _ in range(4):
        w = torch.empty(channels, c_in, 3, 3)
        torch.nn.init.xavier_uniform_(w, generator=gen)
        params += [w, torch.zeros(channels), torch.ones(channels), torch.zeros(channels)]
        c_in = channels
    head = torch.empty(way, features)
    torch.nn.init.xavier_uniform_(head, generator=gen)
    params += [head, torch.zeros(way)]
    return [p.requires_grad_() for p in params]


def features(trunk, x, downsample="max-pool"):
    """The four conv blocks (the first 16 parameters): stride-1 convolutions
    and 2x2 max-pools, flattened, or (downsample="stride", the MAML paper's
    Omniglot network) stride-2 convolutions, averaged over the last map."""
    h = x
    stride = 2 if downsample == "stride" else 1
    for b in range(4):
        w, bias, gamma, beta = trunk[4 * b: 4 * b + 4]
        h = F.conv2d(h, w, bias, stride=stride, padding=1)
        # Batch statistics, biased variance, no running stats (as metagrad).
        h = F.relu(F.batch_norm(h, None, None, gamma, beta, training=True, eps=1e-5))
        if downsample == "max-pool":
            h = F.max_pool2d(h, 2)
    return h.mean(dim=(2, 3)) if downsample == "stride" else h.flatten(1)


def forward(params, x, downsample="max-pool"):
    return F.linear(features(params[:16], x, downsample), params[16], params[17])


def loss_fn(params, x, y, downsample="max-pool"):
    return F.cross_entropy(forward(params, x, downsample), y)


def gradient(params, x, y):
    return torch.autograd.grad(loss_fn(params, x, y), params)


def hvp(params, x, y, v):
    g = torch.autograd.grad(loss_fn(params, x, y), params, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
    return torch.autograd.grad(dot, params)


def maml_step(params, xs, ys, xq, yq, lr=0.4):
    g = torch.autograd.grad(loss_fn(params, xs, ys), params, create_graph=True)
    fast = [p - lr * gi for p, gi in zip(params, g)]
    return torch.autograd.grad(loss_fn(fast, xq, yq), params)


def time_ms(f, warmup, iters):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


SHAPES = [
    ("omniglot 5-way 1-shot", 1, 28, 64, 64, 5, 5, 5),
    ("mini-imagenet 5-way 1-shot", 3, 84, 32, 800, 5, 5, 75),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, c, s, ch, feat, way, ns, nq in SHAPES:
        params = conv4_params(c, ch, feat, way, gen)
        xs, xq = torch.rand(ns, c, s, s, generator=gen), torch.rand(nq, c, s, s, generator=gen)
        ys, yq = torch.arange(ns) % way, torch.arange(nq) % way
        v = [torch.randn(p.shape, generator=gen) for p in params]
        cases = [
            ("gradient", lambda: gradient(params, xs, ys)),
            ("hessian-vector product", lambda: hvp(params, xs, ys, v)),
            ("maml step (exact, r=1)", lambda: maml_step(params, xs, ys, xq, yq)),
        ]
        grad_ms = None
        for op, f in cases:
            med, mn = time_ms(f, args.warmup, args.iters)
            grad_ms = grad_ms or med
            rows.append({
                "workload": f"{name} ({ns}+{nq} images)",
                "backend": f"pytorch {torch.__version__} cpu f32 ({args.threads} threads)",
                "operation": op,
                "ms_median": med,
                "ms_min": mn,
                "relative_to_gradient": med / grad_ms,
            })
    for r in rows:
        print(f"{r['workload']:<42} {r['operation']:<26} {r['ms_median']:>10.2f} ms  x{r['relative_to_gradient']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

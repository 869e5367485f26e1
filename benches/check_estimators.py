#!/usr/bin/env python3
"""The deterministic hypergradient modes of `metagrad hypergrad` against an
independent PyTorch implementation of their definitions, in float64, on
fresh inputs (the random ones, ufo and the subset options, are checked by
their means in `cargo test`):
maml, fomaml, implicit (conjugate gradient), neumann and fixed-point (the
truncated Neumann series), each with every parameter adapted and with the
head only (ANIL: the trunk's hypergradient through the adapted head), on
both Omniglot networks (max-pool, and the paper's stride-2 one).

PyTorch side, written from the definitions (hypergrad/mod.rs):
- the inner loop: r steps of φ ← φ − α∇L_s(φ) (maml, fomaml) or
  φ ← φ − α(∇L_s(φ) + λ(φ − θ)) (the implicit family) on the adapted
  parameters, the others held at θ;
- maml by differentiating the unrolled loop (create_graph), fomaml as ∇L_q(φ_r);
- the implicit family: x solves (I + H/λ) x = ∇L_q(φ) on the adapted block,
  H the support loss's Hessian at φ by double backward, by K steps of
  textbook conjugate gradient or v = η Σ_{i<K} (I − ηA)^i b (η = αλ for
  fixed-point); the held parameters get ∇L_q − (Hx)/λ.

    pip install torch numpy safetensors
    python3 benches/check_estimators.py --metagrad target/release/metagrad
"""
import argparse
import functools
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from compare_train import NAMES  # noqa: E402
from pytorch_autodiff import loss_fn  # noqa: E402

HEAD = 2  # head.weight, head.bias: the last two parameters


def adapt(loss_fn, theta, xs, ys, steps, lr, adapted, lam=None, create_graph=False):
    phi = list(theta)
    for _ in range(steps):
        g = torch.autograd.grad(loss_fn(phi, xs, ys), phi, create_graph=create_graph)
        phi = [p - lr * (gi + (lam * (p - t) if lam else 0)) if i in adapted else p
               for i, (p, gi, t) in enumerate(zip(phi, g, theta))]
    return phi


def hvp(loss_fn, phi, xs, ys, v):
    phi = [p.detach().requires_grad_() for p in phi]
    g = torch.autograd.grad(loss_fn(phi, xs, ys), phi, create_graph=True)
    return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), phi)


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def solve(apply, b, solver, steps, eta):
    if solver == "cg":
        x = [torch.zeros_like(t) for t in b]
        r, p = list(b), list(b)
        rs = dot(r, r)
        for _ in range(steps):
            ap = apply(p)
            a = rs / dot(p, ap)
            x = [xi + a * pi for xi, pi in zip(x, p)]
            r = [ri - a * api for ri, api in zip(r, ap)]
            rs_new = dot(r, r)
            p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
            rs = rs_new
        return x
    term, total = list(b), [eta * t for t in b]
    for _ in range(steps - 1):
        term = [t - eta * at for t, at in zip(term, apply(term))]
        total = [s + eta * t for s, t in zip(total, term)]
    return total


def reference(mode, loss_fn, theta, ep, a):
    xs, ys, xq, yq = ep
    n = len(theta)
    adapted = set(range(n - HEAD, n)) if a.head else set(range(n))
    if mode == "maml":
        phi = adapt(loss_fn, theta, xs, ys, a.inner_steps, a.inner_lr, adapted, create_graph=True)
        return torch.autograd.grad(loss_fn(phi, xq, yq), theta)
    if mode == "fomaml":
        phi = [p.detach().requires_grad_() for p in adapt(loss_fn, theta, xs, ys, a.inner_steps, a.inner_lr, adapted)]
        return torch.autograd.grad(loss_fn(phi, xq, yq), phi)
    phi = [p.detach().requires_grad_() for p in adapt(loss_fn, theta, xs, ys, a.inner_steps, a.inner_lr, adapted, lam=a.lam)]
    gq = torch.autograd.grad(loss_fn(phi, xq, yq), phi)
    mask = lambda v: [t if i in adapted else torch.zeros_like(t) for i, t in enumerate(v)]  # noqa: E731
    apply = lambda v: [vi + hi / a.lam for vi, hi in zip(v, mask(hvp(loss_fn, phi, xs, ys, v)))]  # noqa: E731
    solver, eta = {"implicit": ("cg", None), "neumann": ("series", a.neumann_lr), "fixed-point": ("series", a.inner_lr * a.lam)}[mode]
    steps = a.cg_steps if solver == "cg" else a.neumann_steps
    x = solve(apply, mask(gq), solver, steps, eta)
    held = [g - hx / a.lam for g, hx in zip(gq, hvp(loss_fn, phi, xs, ys, x))]
    return [x[i] if i in adapted else held[i] for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--metagrad", default="metagrad")
    ap.add_argument("--inner-steps", type=int, default=3)
    ap.add_argument("--inner-lr", type=float, default=0.005)
    ap.add_argument("--lam", type=float, default=50.0)
    ap.add_argument("--cg-steps", type=int, default=5)
    ap.add_argument("--neumann-steps", type=int, default=6)
    ap.add_argument("--neumann-lr", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=11, help="seeds the fresh parameters and episode")
    ap.add_argument("--tolerance", type=float, default=1e-8)
    a = ap.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        p, e = os.path.join(tmp, "p.safetensors"), os.path.join(tmp, "e.safetensors")
        subprocess.run([a.metagrad, "init", "--dataset", "omniglot", "--way", "5", "--seed", str(a.seed), "--out", p], check=True, capture_output=True)
        subprocess.run([a.metagrad, "export-episode", "--dataset", "synthetic", "--way", "5", "--shot", "1", "--queries", "3",
                        "--seed", str(a.seed + 1), "--out", e], check=True, capture_output=True)
        params, episode = load_file(p), load_file(e)
        theta = [params[k].double().requires_grad_() for k in NAMES]
        ep = (episode["support_x"].double(), episode["support_y"], episode["query_x"].double(), episode["query_y"])
        # Both Omniglot networks: the max-pool Conv-4, and the paper's strided one (the same parameter shapes).
        for downsample in ("max-pool", "stride"):
            loss = functools.partial(loss_fn, downsample=downsample)
            for a.head in (False, True):
                for mode in ["maml", "fomaml", "implicit", "neumann", "fixed-point"]:
                    out = os.path.join(tmp, "g.safetensors")
                    cmd = [a.metagrad, "hypergrad", "--params", p, "--episode", e, "--mode", mode, "--backend", "cpu", "--precision", "f64",
                           "--inner-steps", str(a.inner_steps), "--inner-lr", str(a.inner_lr), "--lambda", str(a.lam),
                           "--cg-steps", str(a.cg_steps), "--neumann-steps", str(a.neumann_steps), "--neumann-lr", str(a.neumann_lr),
                           "--inner-params", "head" if a.head else "all", "--downsample", downsample, "--out", out]
                    run = subprocess.run(cmd, check=True, capture_output=True, text=True)
                    if "warning" in run.stderr:
                        sys.exit(f"{mode}: metagrad's solver stopped early, pick a larger --lam: {run.stderr.strip()}")
                    ours = load_file(out)
                    theirs = reference(mode, loss, theta, ep, a)
                    scale = max(t.abs().max().item() for t in theirs)
                    err = max((ours[k] - t).abs().max().item() for k, t in zip(NAMES, theirs)) / scale
                    worst = max(worst, err)
                    label = f"{mode}{' (head only)' if a.head else ''}, {downsample}"
                    print(f"{label:<36} max |metagrad - pytorch| / largest entry = {err:.2e} (largest {scale:.3e})")
    print(f"worst {worst:.2e}: {'ok' if worst < a.tolerance else 'DIFFERS'} (tolerance {a.tolerance:g})")
    sys.exit(0 if worst < a.tolerance else 1)


if __name__ == "__main__":
    main()

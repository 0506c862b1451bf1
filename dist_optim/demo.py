"""The one-process demo: every optimizer trains the same small classifier on the same data and a
table of losses is printed. ``python -m dist_optim.demo [--steps N] [--seed S]``."""

from __future__ import annotations

import argparse
import math
import time

import torch

import dist_optim

OPTIMIZERS = {
    "SGD": lambda p: dist_optim.SGD(p, lr=0.05),
    "SGD+Nesterov": lambda p: dist_optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "Adagrad": lambda p: dist_optim.Adagrad(p, lr=0.05),
    "RMSprop": lambda p: dist_optim.RMSprop(p, lr=3e-3),
    "Adam": lambda p: dist_optim.Adam(p, lr=3e-3),
    "AdamW": lambda p: dist_optim.AdamW(p, lr=3e-3, weight_decay=1e-2),
    "RAdam": lambda p: dist_optim.RAdam(p, lr=3e-3),
    "Lookahead(AdamW)": lambda p: dist_optim.Lookahead(dist_optim.AdamW(p, lr=3e-3), k=5, alpha=0.5),
    "Ranger": lambda p: dist_optim.Ranger(p, lr=3e-3),
}


def spirals(n: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved noisy spirals: a small task that a linear model cannot solve."""
    label = torch.randint(0, classes, (n,), generator=gen)
    r = torch.rand(n, generator=gen)
    theta = 4.0 * r + 2.0 * math.pi * label / classes + 0.2 * torch.randn(n, generator=gen)
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    return x, label


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)
    )


def train(make_opt, steps: int, seed: int, data) -> dict[str, float]:
    (x, y), (x_val, y_val) = data
    net = model(seed)
    opt = make_opt(net.parameters())
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    first = None
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = loss_fn(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        logits = net(x_val)
        val_loss = float(loss_fn(logits, y_val))
        acc = float((logits.argmax(1) == y_val).float().mean())
    return {"first": first, "last": float(loss.detach()), "val_loss": val_loss, "val_acc": acc, "ms_per_step": 1e3 * elapsed / steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    gen = torch.Generator().manual_seed(args.seed)
    data = (spirals(4096, 3, gen), spirals(1024, 3, gen))
    print(f"dist-optim {dist_optim.__version__}: 3-class spirals, MLP 2-64-64-3, {args.steps} steps, batch 128, seed {args.seed}\n")
    print(f"| {'optimizer':<17} | first loss | final loss | val loss | val acc | ms/step |")
    print(f"|{'-' * 19}|-----------:|-----------:|---------:|--------:|--------:|")
    for name, make_opt in OPTIMIZERS.items():
        r = train(make_opt, args.steps, args.seed, data)
        print(
            f"| {name:<17} | {r['first']:10.4f} | {r['last']:10.4f} | {r['val_loss']:8.4f} | "
            f"{100 * r['val_acc']:6.1f}% | {r['ms_per_step']:7.2f} |"
        )


if __name__ == "__main__":
    main()

"""Which 8-bit code maps for block-wise quantized optimizer state (issue 12): the error each
candidate map makes on realistic Adam moments, and what it does to training.

    python benchmarks/quant_error.py [--steps 300] [--train-steps 300] [--out benchmarks/results]

Moments:
- ``gpt``: exp_avg / exp_avg_sq of the small GPT of dist_optim.train (dim 128, 2 layers, byte
  tokens of the standard library's sources) after ``--steps`` AdamW steps (lr 3e-3, wd 0.1),
  tensors of >= 4096 elements (the ones that get int8 state);
- ``heavy``: Adam moments after 200 steps on 2**18 coordinates of synthetic heavy-tailed
  gradients: per-coordinate scales log-normal (sigma 2), Student-t noise (3 degrees of freedom),
  and a fifth of the coordinates sparse (gradient nonzero 5% of the steps, like embedding rows).

Per map (block 256): per-block relative L2 error ||q(x) - x|| / ||x|| of m (signed maps) and of v
(unsigned maps), mean and 99th percentile over blocks; and for each signed x unsigned pair the
error of Adam's update direction u = m_hat / (sqrt(v_hat) + eps) (eps 1e-8, bias-corrected):
||u_q - u|| / ||u||, and the largest |u_q - u| (|u| is at most about 1 / sqrt(1 - beta2) ~ 32,
typically ~1: a large value means a v rounded to (near) zero under a nonzero m).

Training: the same GPT trained ``--train-steps`` steps with AdamW whose m and v are stored quantized
(dequantize -> update m, v and the param in fp32 -> quantize for the next step, as a fused kernel
does; tensors below 4096 elements in fp32), final training loss (mean of the last 20 steps) and
validation loss against fp32 state from the same seed and batches.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages, installed or not
from dist_optim.state import blockwise, codes  # noqa: E402
from dist_optim.state.accounting import MIN_QUANTIZED_NUMEL  # noqa: E402
from dist_optim.train.data import VOCAB, Corpus, batch  # noqa: E402
from dist_optim.train.model import TinyGPT, lm_loss  # noqa: E402

BLOCK = 256
SIGNED = ["dynamic_tree-signed", "linear-signed", "power-signed:2", "power-signed:3"]
UNSIGNED = ["dynamic_tree-unsigned", "dynamic_tree_nozero-unsigned", "linear-unsigned", "power-unsigned:2",
            "power-unsigned:4"]
BETA1, BETA2, EPS, LR, WD = 0.9, 0.999, 1e-8, 3e-3, 0.1
MODEL = dict(dim=128, layers=2, heads=4)
CONTEXT, BATCH = 64, 16


def quantize(x: torch.Tensor, name: str) -> torch.Tensor:
    """x through the int8 format (the torch reference) and back."""
    code = codes.named(name)
    c, a = blockwise.quantize_blockwise(x.reshape(-1).contiguous(), code, BLOCK)
    return blockwise.dequantize_blockwise(c, a, code, BLOCK).reshape(x.shape)


def setup(seed: int):
    torch.manual_seed(seed)
    corpus = Corpus.load(None, 4_000_000)
    model = TinyGPT(VOCAB, CONTEXT, **MODEL)
    return corpus, model


def gpt_moments(steps: int, seed: int = 0):
    corpus, model = setup(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD)
    for step in range(steps):
        x, y = batch(corpus.train, BATCH, CONTEXT, seed=seed, step=step, rank=0)
        opt.zero_grad()
        lm_loss(model, x, y).backward()
        opt.step()
    ms, vs = [], []
    for p in model.parameters():
        if p.numel() >= MIN_QUANTIZED_NUMEL:
            s = opt.state[p]
            ms.append(s["exp_avg"].reshape(-1).clone())
            vs.append(s["exp_avg_sq"].reshape(-1).clone())
    return ms, vs, steps


def heavy_moments(steps: int = 200, n: int = 2 ** 18, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(2.0 * torch.randn(n, generator=gen)) * 1e-3
    sparse = torch.rand(n, generator=gen) < 0.2
    student = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    m, v = torch.zeros(n), torch.zeros(n)
    for _ in range(steps):
        g = scale * (0.3 + student.sample((n,)))
        g = torch.where(sparse & (torch.rand(n, generator=gen) > 0.05), torch.zeros_like(g), g)
        m.mul_(BETA1).add_(g, alpha=1 - BETA1)
        v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
    # cut into "tensors" of 2**16 so that blocks and shards look like a model's
    return list(m.split(2 ** 16)), list(v.split(2 ** 16)), steps


def block_errors(xs: list[torch.Tensor], name: str) -> dict:
    errs = []
    for x in xs:
        q = quantize(x, name)
        n = x.numel() // BLOCK * BLOCK  # whole blocks only (a partial block is one in thousands)
        d = (q[:n] - x[:n]).double().view(-1, BLOCK).norm(dim=1)
        r = x[:n].double().view(-1, BLOCK).norm(dim=1)
        errs.append(d[r > 0] / r[r > 0])
    e = torch.cat(errs)
    return {"mean": e.mean().item(), "p99": e.quantile(0.99).item(), "max": e.max().item()}


def direction(m, v, step):
    return (m / (1 - BETA1 ** step)) / ((v / (1 - BETA2 ** step)).sqrt() + EPS)


def update_errors(ms, vs, step, sname, uname) -> dict:
    num = den = 0.0
    worst = 0.0
    for m, v in zip(ms, vs):
        u = direction(m.double(), v.double(), step)
        uq = direction(quantize(m, sname).double(), quantize(v, uname).double(), step)
        num += (uq - u).pow(2).sum().item()
        den += u.pow(2).sum().item()
        worst = max(worst, (uq - u).abs().max().item())
    return {"rel_l2": math.sqrt(num / den), "max_abs": worst}


def train(steps: int, pair: tuple[str, str] | None, seed: int = 0) -> dict:
    """AdamW written out (as torch.optim.AdamW computes it), with m and v quantized after each step."""
    corpus, model = setup(seed)
    params = list(model.parameters())
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    losses = []
    for step in range(1, steps + 1):
        x, y = batch(corpus.train, BATCH, CONTEXT, seed=seed, step=step - 1, rank=0)
        for p in params:
            p.grad = None
        loss = lm_loss(model, x, y)
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p, (m, v) in zip(params, state):
                g = p.grad
                p.mul_(1 - LR * WD)
                m.lerp_(g, 1 - BETA1)
                v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
                denom = (v / (1 - BETA2 ** step)).sqrt_().add_(EPS)
                p.addcdiv_(m, denom, value=-LR / (1 - BETA1 ** step))
                if pair is not None and p.numel() >= MIN_QUANTIZED_NUMEL:
                    # as the fused kernel does: the update uses the fp32 moments in registers,
                    # only what is stored for the next step is quantized
                    m.copy_(quantize(m, pair[0]))
                    v.copy_(quantize(v, pair[1]))
    with torch.no_grad():
        val = []
        for i in range(8):
            x, y = batch(corpus.val, BATCH, CONTEXT, seed=seed + 1, step=i, rank=0)
            val.append(lm_loss(model, x, y).item())
    tail = losses[-20:]
    return {"train_loss": sum(tail) / len(tail), "val_loss": sum(val) / len(val),
            "finite": all(math.isfinite(l) for l in losses)}


def table(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-pairs", default="dynamic_tree-signed/dynamic_tree-unsigned,"
                    "dynamic_tree-signed/dynamic_tree_nozero-unsigned,linear-signed/linear-unsigned,"
                    "power-signed:2/power-unsigned:4,power-signed:3/dynamic_tree_nozero-unsigned")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    data = {"gpt": gpt_moments(args.steps), "heavy": heavy_moments()}
    result = {"command": "python " + " ".join(sys.argv), "block": BLOCK, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "blocks": [], "updates": [], "training": []}
    for dname, (ms, vs, step) in data.items():
        for name in SIGNED:
            result["blocks"].append({"data": dname, "moment": "m", "map": name, **block_errors(ms, name)})
        for name in UNSIGNED:
            result["blocks"].append({"data": dname, "moment": "v", "map": name, **block_errors(vs, name)})
        for s in SIGNED:
            for u in UNSIGNED:
                result["updates"].append({"data": dname, "m map": s, "v map": u, **update_errors(ms, vs, step, s, u)})
        print(f"{dname} done at {time.time() - t0:.0f}s", flush=True)
    pairs = [None] + [tuple(p.split("/")) for p in args.train_pairs.split(",") if p]
    for pair in pairs:
        r = train(args.train_steps, pair)
        result["training"].append({"m map": pair[0] if pair else "fp32", "v map": pair[1] if pair else "fp32", **r})
        print(result["training"][-1], f"{time.time() - t0:.0f}s", flush=True)
    base = result["training"][0]
    for r in result["training"]:
        r["train vs fp32"] = r["train_loss"] - base["train_loss"]
        r["val vs fp32"] = r["val_loss"] - base["val_loss"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_error.json").write_text(json.dumps(result, indent=1))

    def fmt(rows, keys):
        return [{k: (f"{v:.3g}" if isinstance(v, float) and k not in ("train_loss", "val_loss") else
                     f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]

    md = [f"# Quantization error of 8-bit code maps (block {BLOCK})", "", f"`{result['command']}`", "",
          "## Per-block relative error ||q(x) - x|| / ||x||", "",
          table(fmt(result["blocks"], None), ["data", "moment", "map", "mean", "p99", "max"]), "",
          "## Update direction m_hat / (sqrt(v_hat) + eps)", "",
          table(fmt(result["updates"], None), ["data", "m map", "v map", "rel_l2", "max_abs"]), "",
          f"## Training: {args.train_steps} AdamW steps, state quantized after every step", "",
          table(fmt(result["training"], None), ["m map", "v map", "train_loss", "val_loss", "train vs fp32",
                                                "val vs fp32", "finite"]), ""]
    (out / "quant_error.md").write_text("\n".join(md))
    print(f"wrote {out / 'quant_error.md'} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

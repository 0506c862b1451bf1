"""Put the practitioner's claims about optimizers to the test on two small real tasks, >= 3 seeds:

- the byte-level char-LM of ``dist-optim train`` (the standard library's sources), and
- a classifier on scikit-learn's bundled handwritten digits (shipped inside the package, no download).

    python benchmarks/convergence.py [--seeds 3] [--out benchmarks/results] [--state-dtype int8]
    python benchmarks/convergence.py --bf16-update stochastic,nearest,kahan [--optimizers adamw,ranger]

Claims checked (verdicts are computed from the numbers, never written by hand):
1. Adam makes faster early progress than SGD.
2. SGD with momentum generalises at least as well as Adam (test accuracy, within one seed-std).
3. RAdam needs no warmup and tolerates a wider range of learning rates than Adam (no warmup).
4. Lookahead / Ranger train more steadily (smaller seed-to-seed spread and step-to-step jitter of
   the loss over the last part of training) than their base optimizers.

``--state-dtype int8`` runs the same tasks with int8 optimizer state (issue 12) and compares each
optimizer's final losses with the fp32 run's results in ``--out`` (convergence.json): the int8 run
is within the fp32 run's seed spread when the difference of the seed means is at most the fp32
seed std (results in convergence_int8.md/.json; the lr sweep is not rerun).

``--bf16-update MODES`` trains with the weights themselves in bf16 (no fp32 master copy: the
optimizer reads and writes bf16 params, its moments stay fp32) once per rounding mode, and compares
each with the fp32 run in the same way (convergence_bf16.md/.json). ``nearest`` shows what plain
round-to-nearest loses; ``stochastic`` and ``kahan`` are what pure-bf16 training should use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_optim.registry import build_optimizer
from dist_optim.train.data import VOCAB, Corpus, batch
from dist_optim.train.model import TinyGPT, lm_loss

# optimizer label -> (registry name, lr, extra kwargs)
CONFIGS = {
    "sgd": ("sgd", 0.1, {}),
    "sgd+momentum": ("sgd", 0.05, dict(momentum=0.9, nesterov=True)),
    "adam": ("adam", 3e-3, {}),
    "adamw": ("adamw", 3e-3, dict(weight_decay=1e-2)),
    "radam": ("radam", 3e-3, {}),
    "lookahead-adam": ("lookahead-adam", 3e-3, {}),
    "ranger": ("ranger", 3e-3, {}),
}
LR_SWEEP = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def digits(seed: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


# Keyword arguments every optimizer of a run gets (``--state-dtype``).
COMMON: dict = {}


# The weights' dtype (``--bf16-update``: bf16, built in fp32 from the seed and then cast, so that both
# runs start from the same rounded weights' neighbourhood).
WEIGHTS = {"dtype": torch.float32}


def train_digits(name: str, lr: float, extra: dict, seed: int, steps: int = 500, warmup: int = 0):
    (x, y), (xt, yt) = digits(seed)
    x, xt = x.to(WEIGHTS["dtype"]), xt.to(WEIGHTS["dtype"])
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(WEIGHTS["dtype"])
    opt = build_optimizer(name, net.parameters(), lr=lr, backend="torch", **extra, **COMMON)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.cross_entropy(net(x[idx]).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        test_loss = float(F.cross_entropy(net(xt).float(), yt))
        acc = float((net(xt).argmax(1) == yt).float().mean())
    return dict(losses=losses, test_loss=test_loss, test_acc=acc)


def train_lm(name: str, lr: float, extra: dict, seed: int, corpus: Corpus, steps: int = 400):
    torch.manual_seed(seed)
    net = TinyGPT(VOCAB, 64, dim=64, layers=2, heads=4).to(WEIGHTS["dtype"])
    opt = build_optimizer(name, net.parameters(), lr=lr, backend="torch", **extra, **COMMON)
    losses = []
    for step in range(steps):
        x, y = batch(corpus.train, 8, 64, seed=seed, step=step, rank=0)
        loss = lm_loss(net, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        val = statistics.mean(float(lm_loss(net, *batch(corpus.val, 16, 64, seed=99, step=i, rank=0))) for i in range(4))
    return dict(losses=losses, test_loss=val)


def steps_to(losses: list[float], target: float, window: int = 10) -> int | None:
    """First step at which the running mean over ``window`` steps is <= target."""
    for i in range(window, len(losses) + 1):
        if statistics.mean(losses[i - window : i]) <= target:
            return i
    return None


def jitter(losses: list[float], tail: int = 50) -> float:
    """Mean absolute step-to-step change of the loss over the last ``tail`` steps."""
    last = losses[-tail:]
    return statistics.mean(abs(a - b) for a, b in zip(last[1:], last[:-1]))


def summarise(runs: list[dict], target: float) -> dict:
    finals = [statistics.mean(r["losses"][-20:]) for r in runs]
    out = dict(
        final_loss=statistics.mean(finals),
        final_loss_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
        test_loss=statistics.mean(r["test_loss"] for r in runs),
        early_loss=statistics.mean(statistics.mean(r["losses"][20:40]) for r in runs),
        jitter=statistics.mean(jitter(r["losses"]) for r in runs),
        steps_to_target=[steps_to(r["losses"], target) for r in runs],
    )
    if "test_acc" in runs[0]:
        accs = [r["test_acc"] for r in runs]
        out.update(test_acc=statistics.mean(accs), test_acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0)
    return out


def verdicts(res: dict) -> list[tuple[str, bool, str]]:
    out = []
    for task in ("digits", "char-lm"):
        r = res[task]
        ok = r["adam"]["early_loss"] < r["sgd"]["early_loss"]
        out.append((f"1. Adam faster than SGD early ({task})", ok,
                    f"mean loss over steps 20-40: adam {r['adam']['early_loss']:.3f}, sgd {r['sgd']['early_loss']:.3f}"))
    d = res["digits"]
    ok = d["sgd+momentum"]["test_acc"] >= d["adam"]["test_acc"] - d["adam"]["test_acc_std"]
    out.append(("2. SGD+momentum generalises at least as well as Adam (digits)", ok,
                f"test acc sgd+momentum {100 * d['sgd+momentum']['test_acc']:.1f}% vs adam {100 * d['adam']['test_acc']:.1f}% "
                f"(adam seed std {100 * d['adam']['test_acc_std']:.1f}%)"))
    sweep = res["lr_sweep"]
    good = {opt: [lr for lr, v in sweep[opt].items() if v["test_acc"] >= 0.9] for opt in sweep}
    ok = len(good["radam"]) >= len(good["adam"])
    out.append(("3. RAdam without warmup tolerates at least Adam's lr range (digits, no warmup)", ok,
                f"lrs reaching 90% test acc: radam {good['radam']}, adam {good['adam']}"))
    for task in ("digits", "char-lm"):
        r = res[task]
        for steady, base in (("lookahead-adam", "adam"), ("ranger", "radam")):
            ok = r[steady]["jitter"] <= r[base]["jitter"]
            out.append((f"4. {steady} steadier than {base} ({task})", ok,
                        f"step-to-step jitter {r[steady]['jitter']:.4f} vs {r[base]['jitter']:.4f}; "
                        f"seed std of final loss {r[steady]['final_loss_std']:.4f} vs {r[base]['final_loss_std']:.4f}"))
    return out


def markdown(res: dict) -> str:
    lines = [f"# Convergence: the guide's claims on small real tasks ({res['seeds']} seeds, CPU)", ""]
    for task, target in (("digits", 0.3), ("char-lm", 3.0)):
        lines += [f"## {task} (steps to target = first step whose 10-step mean loss <= {target})", "",
                  "| optimizer | lr | final train loss | test loss | test acc | steps to target (per seed) | jitter |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        for label, s in res[task].items():
            acc = f"{100 * s['test_acc']:.1f}% ± {100 * s['test_acc_std']:.1f}" if "test_acc" in s else "-"
            lines.append(f"| {label} | {CONFIGS[label][1]:g} | {s['final_loss']:.3f} ± {s['final_loss_std']:.3f} | "
                         f"{s['test_loss']:.3f} | {acc} | {s['steps_to_target']} | {s['jitter']:.4f} |")
        lines.append("")
    lines += ["## lr sweep without warmup (digits, mean test accuracy over seeds)", "",
              "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in LR_SWEEP) + " |",
              "|---|" + "---:|" * len(LR_SWEEP)]
    for opt, per_lr in res["lr_sweep"].items():
        lines.append(f"| {opt} | " + " | ".join(f"{100 * per_lr[str(lr)]['test_acc']:.1f}%" for lr in LR_SWEEP) + " |")
    lines += ["", "## Verdicts", "",
              "Every optimizer gets the same step budget and one lr (the table's); jitter is compared at "
              "whatever loss each run reached, so a run still descending fast also jitters more.", "",
              "| claim | confirmed | evidence |", "|---|---|---|"]
    lines += [f"| {c} | {'yes' if ok else 'no'} | {ev} |" for c, ok, ev in res["verdicts"]]
    return "\n".join(lines) + "\n"


def int8_markdown(res: dict, fp32: dict) -> str:
    intro = ("Each optimizer's final train loss (mean of the last 20 steps, mean ± std over seeds) with int8 "
             "state against the fp32 run of convergence.md, same seeds and data. Within spread: |int8 mean - "
             "fp32 mean| <= the fp32 seed std. int8 state covers the weights of at least 4096 elements "
             "(dist_optim.state.MIN_QUANTIZED_NUMEL): the digits net's first layer (64 x 64), the char-LM's "
             "embedding, attention and MLP matrices; biases, norms and the digits net's last layer keep fp32. "
             "Plain SGD keeps no state, so its rows are the fp32 run's.")
    return against_fp32(f"# Convergence with int8 optimizer state ({res['seeds']} seeds, CPU)", intro,
                        {"int8": res}, fp32)


def bf16_markdown(by_mode: dict, fp32: dict, seeds: int) -> str:
    intro = ("Each optimizer's final train loss (mean of the last 20 steps, mean ± std over seeds) with the "
             "weights in bf16 and no fp32 master copy, per rounding mode of the update (`bf16_update`), against "
             "the fp32-weights run of convergence.md, same seeds and data; moments are fp32 in both. Within "
             "spread: |bf16 mean - fp32 mean| <= the fp32 seed std (otherwise the table says whether it ended lower "
             "or higher). The forward and backward passes also run "
             "in bf16, so part of any gap is the model's arithmetic, not the optimizer's rounding.")
    return against_fp32(f"# Convergence with bf16 weights ({seeds} seeds, CPU)", intro, by_mode, fp32)


def against_fp32(title: str, intro: str, by_variant: dict, fp32: dict) -> str:
    """One table per task: each variant's final and test losses against the fp32 run's."""
    lines = [title, "", intro, ""]
    for task in ("digits", "char-lm"):
        lines += [f"## {task}", "", "| optimizer | variant | fp32 final loss | final loss | difference | within spread | "
                  "test loss | fp32 test loss |", "|---|---|---:|---:|---:|---|---:|---:|"]
        for variant, res in by_variant.items():
            for label, s in res[task].items():
                f = fp32[task][label]
                diff = s["final_loss"] - f["final_loss"]
                verdict = ("yes" if abs(diff) <= f["final_loss_std"] else
                           "no: lower" if diff < 0 else "no: higher")
                lines.append(f"| {label} | {variant} | {f['final_loss']:.3f} ± {f['final_loss_std']:.3f} | "
                             f"{s['final_loss']:.3f} ± {s['final_loss_std']:.3f} | {diff:+.4f} | {verdict} | "
                             f"{s['test_loss']:.3f} | {f['test_loss']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def run_tasks(labels, seeds, corpus, began) -> dict:
    res: dict = {"seeds": len(seeds), "digits": {}, "char-lm": {}, "lr_sweep": {}}
    for label in labels:
        name, lr, extra = CONFIGS[label]
        res["digits"][label] = summarise([train_digits(name, lr, extra, s) for s in seeds], target=0.3)
        res["char-lm"][label] = summarise([train_lm(name, lr, extra, s, corpus) for s in seeds], target=3.0)
        print(f"{label}: done ({time.time() - began:.0f} s)")
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--state-dtype", default="fp32", choices=("fp32", "int8"))
    parser.add_argument("--bf16-update", default=None, help="comma-separated modes: nearest, stochastic, kahan")
    parser.add_argument("--optimizers", default=None, help="comma-separated labels (default: all; adamw,ranger "
                        "with --bf16-update)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    reference = out / "convergence.json"
    variant = args.state_dtype == "int8" or args.bf16_update is not None
    if variant and not reference.is_file():
        parser.error(f"--state-dtype int8 and --bf16-update compare with the fp32 results, {reference}: run "
                     "without them first")
    if args.state_dtype == "int8":
        COMMON["state_dtype"] = "int8"
    modes = [m.strip() for m in (args.bf16_update or "").split(",") if m.strip()]
    default_labels = "adamw,ranger" if modes else ",".join(CONFIGS)
    labels = [x.strip() for x in (args.optimizers or default_labels).split(",") if x.strip()]
    for label in labels:
        if label not in CONFIGS:
            parser.error(f"--optimizers: {label!r} is not one of {', '.join(CONFIGS)}")
    if args.seeds < 3:
        parser.error("--seeds must be >= 3 (seed-to-seed spread is part of the evidence)")
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    began = time.time()
    corpus = Corpus.load(None, 1_000_000)
    if modes:
        WEIGHTS["dtype"] = torch.bfloat16
        by_mode = {}
        for mode in modes:
            COMMON["bf16_update"] = mode
            by_mode[f"bf16 {mode}"] = run_tasks(labels, seeds, corpus, began)
        (out / "convergence_bf16.json").write_text(json.dumps(by_mode, indent=1, default=str))
        text = bf16_markdown(by_mode, json.loads(reference.read_text()), args.seeds)
        (out / "convergence_bf16.md").write_text(text)
        print(text)
        return
    res = run_tasks(labels, seeds, corpus, began)
    if args.state_dtype == "int8":
        (out / "convergence_int8.json").write_text(json.dumps(res, indent=1, default=str))
        text = int8_markdown(res, json.loads(reference.read_text()))
        (out / "convergence_int8.md").write_text(text)
        print(text)
        return
    for opt in ("adam", "radam"):
        res["lr_sweep"][opt] = {
            str(lr): summarise([train_digits(opt, lr, {}, s) for s in seeds], target=0.3) for lr in LR_SWEEP
        }
    res["verdicts"] = verdicts(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "convergence.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

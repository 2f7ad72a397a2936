"""MLP-oracle study of Section 4.6.2 of the RIFLE paper: does RIFLE learn a first layer closer to the truth?

Two ReLU oracles share their first layer: h_s(x) = relu(x W1) W2 (source) and h_t(x) = relu(x W1) W3
(target). A teacher of the same 100-50-1 architecture is trained from scratch on 1000 noisy source samples,
then transferred to 1000 noisy target samples by (a) SGD with L2 (weight decay) and (b) the same plus RIFLE:
the output layer is re-drawn at the start of periods 2..K and follows the cyclic cosine learning rate. We
report target test MSE against the noise-free oracle and the optimal-transport distance between the learned
first layer and W1. See docs/mlp_oracle.md for the choices the paper leaves open and the measured results.

Usage:
    python scripts/mlp_oracle.py --seeds 10 --output_json mlp_oracle.json --output_md mlp_oracle.md

Needs POT (`pip install pot`), the optimal-transport library the paper cites.
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import ot
import torch
from torch import nn

from ..functional import reinit_head_at_period_start_
from ..schedule import cyclic_cosine_factor

INPUT_DIM, HIDDEN_DIM = 100, 50
PAPER_RESULTS = {
    "l2": {"test_mse": 1.16e-2, "ot_distance": 0.1397},
    "l2_rifle": {"test_mse": 3.98e-3, "ot_distance": 0.1198},
}
METHOD_LABELS = {
    "random_init": "random init (reference)",
    "teacher": "teacher, before transfer (reference)",
    "l2": "L2 fine-tuning",
    "l2_rifle": "L2 + RIFLE",
}


@dataclass(frozen=True)
class StudyConfig:
    """Sizes are the paper's; the rest it leaves open (see docs/mlp_oracle.md).

    The transfer's lr, epochs and weight decay are the best *L2* setting of a grid on development seeds
    100-104, disjoint from the reported seeds 0..N-1, and RIFLE reuses them: tuning favours the baseline.
    """

    num_train: int = 1000
    num_test: int = 10_000
    noise_std: float = 0.1
    batch_size: int = 32
    teacher_epochs: int = 200
    teacher_lr: float = 0.05
    epochs: int = 240
    lr: float = 0.2
    weight_decay: float = 1e-2
    num_periods: int = 3


@dataclass(frozen=True)
class Oracles:
    """Weights in the paper's layout: first_layer is W1 (inputs x hidden units), heads are 50x1."""

    first_layer: torch.Tensor
    source_head: torch.Tensor
    target_head: torch.Tensor


class TwoLayerMLP(nn.Module):
    """relu(x W1) W, bias-free like the oracles, so its first layer is directly comparable to W1."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(INPUT_DIM, HIDDEN_DIM, bias=False)
        self.head = nn.Linear(HIDDEN_DIM, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x))).squeeze(-1)

    def first_layer(self) -> torch.Tensor:
        """W1 in the oracle's (inputs x hidden units) layout; nn.Linear stores its transpose."""
        return self.hidden.weight.detach().T


def stream_seed(seed: int, stream: str) -> int:
    """Seed of the named random stream of run `seed`, hashed so oracles, data, initialization, batch order
    and the library's head draws (seeded by `head_seed`) never share or overlap their draws."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1, np.uint64)[0] >> 1)


def generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream))


def make_oracles(seed: int) -> Oracles:
    """Draw W1 ~ N(0, 1/100) and W2, W3 ~ N(0, 1/50), so pre-activations and outputs are O(1) for x ~ N(0, I)."""
    draw = generator(seed, "oracles")
    return Oracles(
        first_layer=torch.randn(INPUT_DIM, HIDDEN_DIM, generator=draw) / math.sqrt(INPUT_DIM),
        source_head=torch.randn(HIDDEN_DIM, 1, generator=draw) / math.sqrt(HIDDEN_DIM),
        target_head=torch.randn(HIDDEN_DIM, 1, generator=draw) / math.sqrt(HIDDEN_DIM),
    )


def oracle_output(x: torch.Tensor, first_layer: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return (torch.relu(x @ first_layer) @ head).squeeze(-1)


def sample(
    first_layer: torch.Tensor, head: torch.Tensor, n: int, noise_std: float, draw: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """N inputs x ~ N(0, I_100) with labels h(x) + N(0, noise_std^2); noise_std=0 gives the clean oracle."""
    x = torch.randn(n, INPUT_DIM, generator=draw)
    return x, oracle_output(x, first_layer, head) + noise_std * torch.randn(n, generator=draw)


def new_mlp(seed: int) -> TwoLayerMLP:
    """A freshly initialized student (PyTorch's default Linear init), reproducible from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "init"))
        return TwoLayerMLP()


def train_mlp(
    model: TwoLayerMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    weight_decay: float,
    rifle: int | None,
    seed: int,
    batch_size: int = 32,
) -> None:
    """Mini-batch SGD on the MSE loss, in place; both layers follow one cosine annealing over the run.

    `rifle=K` splits the run into K periods (Algorithm 1): the head is re-drawn at the start of periods
    2..K by the library's `reinit_head_at_period_start_`, and its learning rate restarts the cosine every period.
    `rifle=None` is plain fine-tuning (the K=1 case). Mini-batch order depends on `seed` only, so L2 and
    L2 + RIFLE runs with one seed see the same batches and differ only by RIFLE.
    """
    num_periods = rifle or 1
    batches_per_epoch = math.ceil(len(x) / batch_size)
    max_steps = epochs * batches_per_epoch
    optimizer = torch.optim.SGD(
        [{"params": model.hidden.parameters()}, {"params": model.head.parameters()}],
        lr=lr,
        weight_decay=weight_decay,
    )
    backbone_group, head_group = optimizer.param_groups
    order = generator(seed, "batches")
    step = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(batch_size):
            reinit_head_at_period_start_(model, optimizer, step, max_steps, num_periods, seed, head_module="head")
            backbone_group["lr"] = lr * cyclic_cosine_factor(step, max_steps, 1)
            head_group["lr"] = lr * cyclic_cosine_factor(step, max_steps, num_periods)
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1


def ot_distance(learned_first_layer: torch.Tensor, oracle_first_layer: torch.Tensor) -> float:
    """Exact OT (earth mover's) distance between the two layers' hidden units, each a unit-norm column.

    Hidden units are interchangeable (any permutation computes the same function) and a ReLU unit's
    incoming weights are only defined up to a positive scale (relu(a z) w = relu(z) a w for a > 0), so each
    column is normalized and the units are matched by OT with uniform mass 1/50 each and Euclidean cost.
    With equal uniform masses the optimum is a permutation: the mean distance between matched units.
    """
    learned, oracle = (np.asarray(w, dtype=np.float64).T for w in (learned_first_layer, oracle_first_layer))
    learned, oracle = (w / np.linalg.norm(w, axis=1, keepdims=True) for w in (learned, oracle))
    cost = np.linalg.norm(learned[:, None, :] - oracle[None, :, :], axis=-1)  # exactly 0 for equal units
    mass = np.full(len(learned), 1.0 / len(learned))
    return float(ot.emd2(mass, mass, cost))


@torch.no_grad()
def mse(model: TwoLayerMLP, x: torch.Tensor, y: torch.Tensor) -> float:
    return nn.functional.mse_loss(model(x), y).item()


def run_seed(seed: int, config: StudyConfig) -> dict[str, dict[str, float]]:
    """Teacher on the source task, then both transfers from it, with every metric of every model.

    Test MSE is against the noise-free target oracle on fresh inputs (the label noise would only add its
    variance); relative MSE divides it by the oracle's output variance, which makes it independent of the
    oracle's scale, a choice the paper leaves open.
    """
    oracles = make_oracles(seed)
    source_x, source_y = sample(
        oracles.first_layer, oracles.source_head, config.num_train, config.noise_std, generator(seed, "source")
    )
    target_x, target_y = sample(
        oracles.first_layer, oracles.target_head, config.num_train, config.noise_std, generator(seed, "target")
    )
    test_x, clean_source_y = sample(
        oracles.first_layer, oracles.source_head, config.num_test, 0.0, generator(seed, "test")
    )
    clean_target_y = oracle_output(test_x, oracles.first_layer, oracles.target_head)

    teacher = new_mlp(seed)
    results = {"random_init": {"ot_distance": ot_distance(teacher.first_layer(), oracles.first_layer)}}
    # Vanilla SGD as in the paper: no weight decay, no RIFLE.
    train_mlp(teacher, source_x, source_y, config.teacher_epochs, config.teacher_lr, 0.0, None, seed, config.batch_size)
    results["teacher"] = {
        "source_test_mse": mse(teacher, test_x, clean_source_y),
        "ot_distance": ot_distance(teacher.first_layer(), oracles.first_layer),
    }
    for method, rifle in (("l2", None), ("l2_rifle", config.num_periods)):
        student = new_mlp(seed)
        student.load_state_dict(teacher.state_dict())
        train_mlp(
            student, target_x, target_y, config.epochs, config.lr, config.weight_decay, rifle, seed, config.batch_size
        )
        test_mse = mse(student, test_x, clean_target_y)
        results[method] = {
            "train_mse": mse(student, target_x, target_y),
            "test_mse": test_mse,
            "relative_test_mse": test_mse / clean_target_y.var().item(),
            "ot_distance": ot_distance(student.first_layer(), oracles.first_layer),
        }
    return results


def mean_and_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    array = np.asarray(values)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def summarize(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Every metric of every method over the seeds."""
    return {
        method: {metric: mean_and_std([run[method][metric] for run in per_seed]) for metric in metrics}
        for method, metrics in per_seed[0].items()
    }


def paired_comparison(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """RIFLE minus L2 seed by seed, and on how many seeds RIFLE is lower.

    Both runs of a seed share oracles, data, teacher and batch order, so the paired difference isolates
    RIFLE from the seed-to-seed spread of the oracles, which dominates the per-method std.
    """
    comparison = {}
    for metric in ("test_mse", "ot_distance"):
        differences = [run["l2_rifle"][metric] - run["l2"][metric] for run in per_seed]
        comparison[metric] = {**mean_and_std(differences), "rifle_lower": sum(d < 0 for d in differences)}
    return comparison


def markdown_table(summary: dict, comparison: dict, num_seeds: int) -> str:
    def ours(method: str, metric: str, digits: str) -> str:
        value = summary[method].get(metric)
        return f"{value['mean']:{digits}} ± {value['std']:{digits}}" if value else "—"

    def paper(method: str, metric: str, digits: str) -> str:
        return f"{PAPER_RESULTS[method][metric]:{digits}}" if method in PAPER_RESULTS else "—"

    lines = [
        f"| model ({num_seeds} seeds, mean ± std) | target test MSE | relative MSE | paper MSE "
        "| OT(learned W1, oracle W1) | paper OT |",
        "|---|---|---|---|---|---|",
    ]
    for method, label in METHOD_LABELS.items():
        lines.append(
            f"| {label} | {ours(method, 'test_mse', '.3e')} | {ours(method, 'relative_test_mse', '.3f')} "
            f"| {paper(method, 'test_mse', '.2e')} | {ours(method, 'ot_distance', '.4f')} "
            f"| {paper(method, 'ot_distance', '.4f')} |"
        )
    mse_diff, ot_diff = comparison["test_mse"], comparison["ot_distance"]
    lines += [
        "",
        f"Paired, RIFLE − L2: test MSE {mse_diff['mean']:+.3e} ± {mse_diff['std']:.3e} "
        f"(RIFLE lower on {mse_diff['rifle_lower']}/{num_seeds} seeds), "
        f"OT {ot_diff['mean']:+.4f} ± {ot_diff['std']:.4f} "
        f"(RIFLE lower on {ot_diff['rifle_lower']}/{num_seeds} seeds).",
        f"Teacher's test MSE on its own (source) task: {ours('teacher', 'source_test_mse', '.3e')}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds")
    parser.add_argument("--first_seed", type=int, default=0, help="run seeds first_seed..first_seed+N-1")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="transfer epochs on the target task")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of the transfer")
    parser.add_argument("--weight_decay", type=float, default=defaults.weight_decay, help="L2 strength of the transfer")
    parser.add_argument("--num_periods", type=int, default=defaults.num_periods, help="RIFLE's K")
    parser.add_argument("--teacher_epochs", type=int, default=defaults.teacher_epochs)
    parser.add_argument("--teacher_lr", type=float, default=defaults.teacher_lr)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--noise_std", type=float, default=defaults.noise_std, help="label noise std (0.1: the paper's variance 0.01)"
    )
    parser.add_argument("--num_train", type=int, default=defaults.num_train, help="source and target samples each")
    parser.add_argument("--num_test", type=int, default=defaults.num_test, help="fresh test samples per seed")
    parser.add_argument("--output_json", help="write config, per-seed results and summary here")
    parser.add_argument("--output_md", help="write the Markdown table here")
    args = parser.parse_args(argv)
    config = StudyConfig(**{field: getattr(args, field) for field in asdict(defaults)})

    # Batches of 32 x 100 gain nothing from intra-op threads, which only spin against each other and other load.
    torch.set_num_threads(1)
    started = time.perf_counter()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    per_seed = []
    for seed in seeds:
        per_seed.append(run_seed(seed, config))
        print(f"seed {seed}: " + json.dumps(per_seed[-1]), flush=True)
    runtime_s = time.perf_counter() - started
    summary, comparison = summarize(per_seed), paired_comparison(per_seed)
    table = markdown_table(summary, comparison, args.seeds)
    print(table)
    print(f"runtime: {runtime_s:.1f} s")
    if args.output_md:
        with open(args.output_md, "w") as file:
            file.write(table + "\n")
    if args.output_json:
        report = {
            "config": asdict(config),
            "seeds": seeds,
            "paper": PAPER_RESULTS,
            "summary": summary,
            "rifle_minus_l2": comparison,
            "per_seed": per_seed,
            "runtime_s": runtime_s,
        }
        with open(args.output_json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()

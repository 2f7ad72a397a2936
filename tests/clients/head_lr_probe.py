"""Run a training script (argv[2:]) as `python script ...` would, and measure each optimizer update from outside.

`python head_lr_probe.py OUT.jsonl SCRIPT [ARG ...]` writes one JSON line per optimizer update: the learning rate the
loop's scheduler set on the head's param group (`lr`, and its peak `initial_lr`), the learning rate the head and the
backbone actually moved by (`head_lr`, `backbone_lr`), and a fingerprint of the head before the update.

The probe knows nothing of RIFLE. It uses torch's global optimizer hooks, which run before every optimizer's own step
pre-hooks and after its own post-hooks (so after RIFLE's rescaling), and measures a learning rate as an optimizer's
update divided by its step direction, which the optimizer's state holds after the step:

- SGD: the update is -lr * buf (momentum), -lr * (g + momentum * buf) (Nesterov) or -lr * g (no momentum), with
  g = grad + weight_decay * w;
- AdamW: -lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w).

The measured rate is the least-squares fit of update = -rate * direction over a set of parameters. The head is
`hf_rifle.find_head` of the first module run in training mode with gradients enabled (the model, or timm's task that
holds it); it is measured on the unpatched script as on the patched one.
"""

import hashlib
import json
import runpy
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from hf_rifle import find_head


class Probe:
    def __init__(self, path: str):
        self.path = path
        self.head = None  # the head's parameters, once the model has run
        self.update = 0
        self.before = {}
        self.forward_hook = torch.nn.modules.module.register_module_forward_pre_hook(self.find_model)
        register_optimizer_step_pre_hook(self.before_update)
        register_optimizer_step_post_hook(self.after_update)

    def find_model(self, module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        try:  # data transforms are modules too: the first module with a classification head is the model
            _, head = find_head(module)
        except ValueError:
            return
        self.head = list(head.parameters())
        self.forward_hook.remove()

    @torch.no_grad()
    def before_update(self, optimizer, args, kwargs) -> None:
        self.before = {p: p.detach().double().clone() for group in optimizer.param_groups for p in group["params"]}

    @torch.no_grad()
    def after_update(self, optimizer, args, kwargs) -> None:
        head_ids = {id(p) for p in self.head}
        moves = {"head": [], "backbone": []}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    move = (p.detach().double() - self.before[p], direction(optimizer, group, p, self.before[p]))
                    moves["head" if id(p) in head_ids else "backbone"].append(move)
        head_group = next(g for g in optimizer.param_groups if any(id(p) in head_ids for p in g["params"]))
        record = {
            "update": self.update,
            "lr": head_group["lr"],
            "initial_lr": head_group.get("initial_lr"),
            "head_lr": fitted_rate(moves["head"]),
            "backbone_lr": fitted_rate(moves["backbone"]),
            "head_before": fingerprint(self.before[p] for p in self.head),
        }
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        self.update += 1
        self.before = {}


def direction(optimizer, group: dict, p: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """What the optimizer multiplies by -lr to update `p`, from its state after the step."""
    state, grad = optimizer.state[p], p.grad.double()
    if isinstance(optimizer, torch.optim.AdamW):
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        m_hat = state["exp_avg"].double() / (1 - beta1**step)
        v_hat = state["exp_avg_sq"].double() / (1 - beta2**step)
        return m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * before
    if isinstance(optimizer, torch.optim.SGD):
        grad = grad + group["weight_decay"] * before
        if not group["momentum"]:
            return grad
        buffer = state["momentum_buffer"].double()
        return grad + group["momentum"] * buffer if group["nesterov"] else buffer
    raise NotImplementedError(f"the probe measures SGD and AdamW updates, not {type(optimizer).__name__}")


def fitted_rate(moves: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    update = torch.cat([move.flatten() for move, _ in moves])
    step_direction = torch.cat([d.flatten() for _, d in moves])
    return -float(update @ step_direction / (step_direction @ step_direction))


def fingerprint(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    output, script, *script_args = sys.argv[1:]
    Probe(output)
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")

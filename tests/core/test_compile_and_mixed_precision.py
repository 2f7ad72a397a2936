"""RIFLE under torch.compile (no recompilation after a re-init) and fp16 loss scaling (L2-SP's exact gradient)."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch._dynamo.utils import counters
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_rifle import RifleConfig, RifleTrainer, RifleTrainerCallback

from ..helpers import RandomImages, timm_wrapper_resnet, tiny_run_settings


class GraphCounts(TrainerCallback):
    """dynamo's count of compiled graphs after every step."""

    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append(counters["stats"]["unique_graphs"])


@pytest.mark.slow  # 11 to 14 s each: compiling
@pytest.mark.parametrize("path", ["rifle_trainer", "trainer_callback"])
def test_torch_compile_compiles_once_and_not_again_after_the_head_is_reinitialized(tmp_path, path):
    torch._dynamo.reset()
    counters.clear()
    graphs = GraphCounts()
    # 9 steps, K=3: re-inits at steps 3 and 6; the eager backend keeps dynamo's guards without a C++ compiler.
    settings = tiny_run_settings(tmp_path, torch_compile=True, torch_compile_backend="eager")
    model = timm_wrapper_resnet()
    # transformers sets problem_type at the first loss, which alone recompiles once (the recipe sets it up front).
    model.config.problem_type = "single_label_classification"
    if path == "rifle_trainer":
        trainer = RifleTrainer(
            model=model, args=RifleConfig(**settings, num_periods=3), train_dataset=RandomImages(), callbacks=[graphs]
        )
    else:
        callbacks = [RifleTrainerCallback(num_periods=3), graphs]
        trainer = Trainer(
            model=model, args=TrainingArguments(**settings), train_dataset=RandomImages(), callbacks=callbacks
        )
    trainer.train()
    assert graphs.after_step[0] > 0  # compiled at the first step...
    assert graphs.after_step == [graphs.after_step[0]] * 9  # ...and never again: the re-inits kept every guard
    assert counters["stats"]["calls_captured"] > 0


def l2sp_step(loss_scale: float | None) -> list[torch.Tensor]:
    """One SGD step of a tiny model with L2-SP through the callback's pre-step hook, optionally under fp16-style
    loss scaling (accelerate's optimizer wrapper with a GradScaler), no clipping: the weights after the step."""
    torch.manual_seed(0)
    model = timm_wrapper_resnet()
    callback = RifleTrainerCallback(regularizer="l2sp", l2sp_alpha=0.5, l2sp_beta=0.1, reinit_head=False)
    callback.on_init_end(None, None, None, model=model)
    with torch.no_grad():  # move away from the pretrained weights, so the L2-SP gradient is not zero
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale) if loss_scale else None
    args = TrainingArguments(**tiny_run_settings("unused"))
    Accelerator(cpu=True)  # the state accelerate's optimizer wrapper reads
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device_placement=False, scaler=scaler)
    data = RandomImages()
    loss = model(pixel_values=data.images[:4], labels=data.labels[:4]).loss
    (scaler.scale(loss) if scaler else loss).backward()
    callback.on_pre_optimizer_step(args, None, None, model=model, optimizer=optimizer)
    optimizer.step()
    return [parameter.detach().clone() for parameter in model.parameters()]


def test_l2sp_gradient_is_exact_under_fp16_loss_scaling_without_clipping():
    for scaled, reference in zip(l2sp_step(loss_scale=1024.0), l2sp_step(loss_scale=None)):
        torch.testing.assert_close(scaled, reference)

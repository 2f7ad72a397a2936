import pytest
import timm
import torch
from torch import nn

from hf_rifle import clear_optimizer_state_, find_head, head_seed, reinit_head_

from ..helpers import native_resnet, timm_wrapper_resnet


@pytest.mark.parametrize(
    "build,expected_name,expected_type",
    [
        (lambda: timm.create_model("test_resnet", num_classes=4), "fc", nn.Linear),
        (lambda: timm_wrapper_resnet(), "timm_model.fc", nn.Linear),
        (lambda: native_resnet(), "classifier", nn.Sequential),
        (lambda: timm.create_model("test_vit", num_classes=4), "head", nn.Linear),
        (lambda: timm.create_model("test_convnext", num_classes=4), "head.fc", nn.Linear),
        (lambda: timm_wrapper_resnet("test_efficientnet"), "timm_model.classifier", nn.Linear),
    ],
    ids=[
        "timm-resnet",
        "timm-wrapper-resnet",
        "native-resnet",
        "timm-vit",
        "timm-convnext",
        "timm-wrapper-efficientnet",
    ],
)
def test_head_discovery(build, expected_name, expected_type):
    model = build()
    name, head = find_head(model)
    assert name == expected_name
    assert isinstance(head, expected_type)
    assert head is model.get_submodule(name)


def test_explicit_head_module_overrides_discovery():
    model = native_resnet()
    name, head = find_head(model, "classifier.1")
    assert name == "classifier.1" and isinstance(head, nn.Linear)


def test_missing_head_module_names_the_top_level_modules():
    with pytest.raises(ValueError, match=r"head_module='classifer' does not exist.*resnet, classifier"):
        find_head(native_resnet(), "classifer")


def test_head_module_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="has no trainable parameters"):
        find_head(native_resnet(), "classifier.0")


def test_no_head_lists_linear_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"Linear layers in the model: 0, 2\. Name the head with head_module"):
        find_head(model)


def test_reinit_is_in_place_and_deterministic():
    model = timm_wrapper_resnet()
    _, head = find_head(model)
    params_before = [(p, p.data_ptr(), p.detach().clone()) for p in head.parameters()]

    reinit_head_(head, head_seed(seed=42, period=1))
    first = [p.detach().clone() for p in head.parameters()]
    for (param, pointer, old), new in zip(params_before, head.parameters()):
        assert new is param and new.data_ptr() == pointer
        assert not torch.equal(old, new)

    reinit_head_(head, head_seed(seed=42, period=1))
    assert all(torch.equal(a, b) for a, b in zip(first, head.parameters()))
    reinit_head_(head, head_seed(seed=42, period=2))
    assert not torch.equal(first[0], head.weight)


def test_default_init_is_the_modules_reset_parameters():
    _, head = find_head(timm.create_model("test_resnet", num_classes=4))
    reinit_head_(head, seed=7, init="default")
    expected = nn.Linear(head.in_features, head.out_features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        expected.reset_parameters()
    assert torch.equal(head.weight, expected.weight) and torch.equal(head.bias, expected.bias)


def test_normal_init_is_algorithm_1():
    head = nn.Linear(512, 256)
    reinit_head_(head, seed=0, init="normal", std=0.01)
    assert head.weight.mean().abs() < 1e-3
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.count_nonzero(head.bias) == 0


def test_reinit_leaves_the_global_random_stream_alone():
    head = nn.Linear(4, 2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    reinit_head_(head, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_clear_optimizer_state_forgets_only_the_head():
    model = native_resnet()
    _, head = find_head(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    head_params = set(head.parameters())
    assert all(p in optimizer.state for p in model.parameters())

    clear_optimizer_state_(optimizer, head.parameters())
    assert all((p in optimizer.state) == (p not in head_params) for p in model.parameters())


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"num_periods": 0}, "num_periods must be >= 1"),
        ({"head_init": "xavier"}, "Unknown head_init='xavier'"),
        ({"head_init_std": float("nan")}, "head_init_std must be a finite number >= 0"),
    ],
)
def test_callback_refuses_bad_settings(settings, message):
    from hf_rifle import RifleTrainerCallback

    with pytest.raises(ValueError, match=message):
        RifleTrainerCallback(**settings)


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
def test_a_head_sharing_a_group_with_the_backbone_restarts_its_momentum_with_any_sgd(fused):
    """Fused SGD cannot mix fresh and running momentum buffers in one group: the head's is zeroed there, which gives
    the update that starting it afresh gives."""
    updates = {}
    for implementation in ("reference", "tested"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, fused=fused and implementation == "tested", foreach=False
        )
        for step in range(3):
            if step == 2:
                clear_optimizer_state_(optimizer, model[1].parameters())
            model(torch.ones(3, 4)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        updates[implementation] = [p.detach().clone() for p in model.parameters()]
    for reference, tested in zip(updates["reference"], updates["tested"]):
        torch.testing.assert_close(tested, reference)

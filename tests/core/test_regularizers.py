import pytest
import torch

from hf_rifle import find_head, l2sp_penalty, split_backbone_and_head
from hf_rifle.regularizers import add_l2sp_gradient_, snapshot

from ..helpers import native_resnet


def direct_l2sp(backbone, reference, head, alpha, beta):
    drift = sum(((w - w0) ** 2).sum() for w, w0 in zip(backbone, reference))
    return alpha / 2 * drift + beta / 2 * sum((w**2).sum() for w in head)


def drifted_model():
    model = native_resnet()
    _, head = find_head(model)
    backbone, head_params = split_backbone_and_head(model, head)
    reference = snapshot(backbone)
    with torch.no_grad():
        for param in backbone:
            param.add_(torch.randn_like(param) * 0.1)
    return model, backbone, reference, head_params


def test_split_covers_batchnorm_affine_but_not_buffers():
    model = native_resnet()
    _, head = find_head(model)
    backbone, head_params = split_backbone_and_head(model, head)
    names = {id(p): n for n, p in model.named_parameters()}
    backbone_names = {names[id(p)] for p in backbone}
    assert {names[id(p)] for p in head_params} == {"classifier.1.weight", "classifier.1.bias"}
    assert any(n.endswith("normalization.weight") for n in backbone_names)
    assert any(n.endswith("normalization.bias") for n in backbone_names)
    assert len(backbone) + len(head_params) == len(list(model.parameters()))
    buffer_ids = {id(b) for b in model.buffers()}
    assert not any(id(p) in buffer_ids for p in backbone)


def test_penalty_value_and_gradient_match_the_formula():
    _, backbone, reference, head = drifted_model()
    alpha, beta = 0.01, 0.03
    penalty = l2sp_penalty(backbone, reference, head, alpha, beta)
    grads = torch.autograd.grad(penalty, backbone + head)

    expected = direct_l2sp(backbone, reference, head, alpha, beta)
    expected_grads = torch.autograd.grad(expected, backbone + head)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    for grad, w, w0 in zip(grads, backbone, reference):
        torch.testing.assert_close(grad, alpha * (w - w0))


def test_penalty_gradient_is_zero_not_nan_at_the_pretrained_weights():
    model = native_resnet()
    _, head = find_head(model)
    backbone, head_params = split_backbone_and_head(model, head)
    grads = torch.autograd.grad(l2sp_penalty(backbone, snapshot(backbone), head_params, 0.1, 0.0), backbone)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_added_gradient_equals_autograd_of_the_penalty():
    _, backbone, reference, head = drifted_model()
    existing = [torch.randn_like(p) for p in backbone + head]
    expected = torch.autograd.grad(l2sp_penalty(backbone, reference, head, 0.01, 0.03), backbone + head)
    for param, grad in zip(backbone + head, existing):
        param.grad = grad.clone()
    add_l2sp_gradient_(backbone, reference, head, 0.01, 0.03)
    for param, before, penalty_grad in zip(backbone + head, existing, expected):
        torch.testing.assert_close(param.grad, before + penalty_grad)

"""The model zoo: every name builds, runs, and has its published size."""

from __future__ import annotations

import pytest
import torch

from orc_fast.models import IMAGENET_PARAMS, MODELS, PUBLISHED_PARAMS, build_model, model_names

ISSUE_NAMES = [
    "resnet8", "resnet14", "resnet20", "resnet26", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_2", "wrn_40_2", "vgg8", "vgg11", "vgg13", "mobilenetv2", "shufflenetv1", "shufflenetv2",
    "resnet18", "resnet34",
]


def count_params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_the_zoo_has_every_model_of_the_issue():
    assert sorted(model_names()) == sorted(ISSUE_NAMES)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_published_ones(name):
    # Published counts (100 classes) are given to two decimals in millions.
    assert count_params(build_model(name, 100)) == pytest.approx(PUBLISHED_PARAMS[name], abs=0.006)


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAMS))
def test_imagenet_resnets_have_their_published_size(name):
    # He et al. 2016 / torchvision: 11.69 M (ResNet18) and 21.80 M (ResNet34) at 1000 classes.
    assert count_params(build_model(name, 1000)) == pytest.approx(IMAGENET_PARAMS[name], abs=0.006)


def test_resnet26_is_the_6n_plus_2_resnet_with_four_blocks_per_stage():
    model = build_model("resnet26", 10)
    assert len(model.features) == 12 and count_params(model) == pytest.approx(0.37, abs=0.006)


def test_headline_counts():
    assert round(count_params(build_model("resnet32", 100)), 2) == 0.47
    assert round(count_params(build_model("wrn_40_2", 100)), 1) == 2.3  # "about 2.2M": 2.26M


@pytest.mark.parametrize("name", ISSUE_NAMES)
def test_forward_shapes(name):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"])
def test_backward_reaches_every_parameter(name):
    model = build_model(name, 7)
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_other_input_sizes_work():
    assert build_model("resnet8", 10)(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_members_get_different_initialisations():
    torch.manual_seed(0)
    a, b = build_model("resnet8", 10), build_model("resnet8", 10)
    assert not torch.equal(a.fc.weight, b.fc.weight)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown arch 'resnet9'"):
        build_model("resnet9", 10)
    with pytest.raises(ValueError):
        build_model("resnet8", 0)
    assert set(MODELS) == set(ISSUE_NAMES)

"""The networks' topology (randomly initialised: these test structure, not skill)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dermpacs.inference.networks import (
    AtrousSpatialPyramidPooling,
    DeepLabV3Plus,
    ImagePooling,
    NetworkError,
    architecture_of,
    build_classifier,
    build_network,
    count_multiply_adds,
    count_parameters,
)

SMALL = {"aspp_channels": 16, "decoder_channels": 16, "low_level_channels": 8}


def _aspp_input_shape(model: DeepLabV3Plus, x: torch.Tensor) -> torch.Size:
    seen: list[torch.Size] = []
    handle = model.aspp.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize(
    ("encoder_name", "deepest_stage", "high_channels"),
    [
        ("efficientnet-b0", "omitted", 112),
        ("efficientnet-b0", "dilated", 320),
        ("resnet10", "omitted", 256),
        ("resnet10", "dilated", 512),
    ],
)
def test_output_stride_16_and_full_size_logits(
    encoder_name: str, deepest_stage: str, high_channels: int
) -> None:
    model = DeepLabV3Plus(
        spatial_dims=2,
        in_channels=3,
        out_channels=3,
        encoder_name=encoder_name,
        deepest_stage=deepest_stage,  # type: ignore[arg-type]
        **SMALL,
    )
    x = torch.randn(2, 3, 128, 192)
    assert _aspp_input_shape(model, x) == (2, high_channels, 128 // 16, 192 // 16)
    with torch.no_grad():
        assert model(x).shape == (2, 3, 128, 192)


def test_input_not_a_multiple_of_32_still_gives_input_sized_logits() -> None:
    model = DeepLabV3Plus(**SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 100, 75)).shape == (1, 3, 100, 75)


def test_aspp_branches_rates_and_image_pooling() -> None:
    model = DeepLabV3Plus()
    branches = list(model.aspp.branches)
    assert len(branches) == 5  # 1x1, three atrous, image pooling
    dilations = []
    for branch in branches[1:4]:
        convs = [
            m for m in branch.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        ]
        assert len(convs) == 1
        dilations.append(convs[0].dilation)
        assert convs[0].groups == convs[0].in_channels  # depthwise-separable by default
    assert dilations == [(6, 6), (12, 12), (18, 18)]
    assert isinstance(branches[4], ImagePooling)
    assert model.low_level_projection.conv.out_channels == 48  # type: ignore[union-attr]


def test_image_pooling_branch_is_constant_over_space() -> None:
    pooling = ImagePooling(2, 4, 3, ("relu", {}))
    out = pooling(torch.randn(2, 4, 5, 7))
    assert out.shape == (2, 3, 5, 7)
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))


def test_aspp_plain_convolutions_and_bad_rates() -> None:
    aspp = AtrousSpatialPyramidPooling(2, 8, 4, (2, 3), separable=False, dropout=0.0)
    assert aspp(torch.randn(1, 8, 9, 9)).shape == (1, 4, 9, 9)
    with pytest.raises(NetworkError):
        AtrousSpatialPyramidPooling(2, 8, 4, (0, 3))


def test_trains_on_a_batch_of_one() -> None:
    model = DeepLabV3Plus(**SMALL).train()
    logits = model(torch.randn(1, 3, 64, 64))
    logits.mean().backward()
    assert model.classifier.conv.weight.grad is not None  # type: ignore[union-attr]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(NetworkError):
        DeepLabV3Plus(spatial_dims=3)
    with pytest.raises(NetworkError):
        DeepLabV3Plus(encoder_name="vgg16")
    with pytest.raises(NetworkError):
        DeepLabV3Plus(deepest_stage="strided")  # type: ignore[arg-type]
    with pytest.raises(NetworkError):
        DeepLabV3Plus(aspp_channels=0)
    with pytest.raises(NetworkError):
        build_classifier(1)
    with pytest.raises(NetworkError):
        build_classifier(4, backbone="vgg")


def test_default_fits_a_cpu_budget() -> None:
    # Reported in the module text: 0.97 M parameters, 1.23 G multiply-adds at 512 x 384.
    model = DeepLabV3Plus()
    assert count_parameters(model) < 1.5e6
    assert count_multiply_adds(model, (1, 3, 384, 512)) < 1.5e9
    assert count_multiply_adds(model, (1, 3, 192, 256)) < 0.4e9


@pytest.mark.parametrize("backbone", ["resnet", "efficientnet-b0", "densenet121"])
def test_classifiers(backbone: str) -> None:
    model = build_classifier(4, backbone=backbone).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 4)
    rebuilt = build_network(architecture_of(model))
    assert type(rebuilt) is type(model)
    assert set(rebuilt.state_dict()) == set(model.state_dict())


def test_architecture_round_trip_for_segmentation() -> None:
    model = DeepLabV3Plus(encoder_name="resnet10", deepest_stage="dilated", **SMALL)
    spec = architecture_of(model)
    assert spec.name == "deeplabv3plus" and spec.args["encoder_name"] == "resnet10"
    rebuilt = build_network(spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(NetworkError):
        architecture_of(nn.Linear(2, 2))

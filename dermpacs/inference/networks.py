"""The method's two networks: DeepLabv3+ for skin and lesion, and the crop classifier.

Both are built from MONAI parts. The segmentation network takes a MONAI 2D encoder from
``FLEXUNET_BACKBONE`` (EfficientNet or ResNet family, never pretrained: nothing is downloaded)
and adds what MONAI lacks for DeepLabv3+ (Chen et al., ECCV 2018): an ASPP with an image-pooling
branch and atrous rates 6/12/18, and a decoder that fuses stride-4 features projected to 48
channels.

Output stride 16
----------------
MONAI's encoders return five feature maps at strides 2, 4, 8, 16 and 32 (for EfficientNet-B0 with
16, 24, 40, 112 and 320 channels; the stride-32 map comes from the stack ``r4_k5_s22`` that turns
112 into 192 channels and the last stack ``r1_k3_s11`` that gives 320). DeepLabv3+ wants the ASPP
on stride-16 features. Two ways are offered by ``deepest_stage``:

``"dilated"``
    The stride-32 stage keeps its weights but its first strided convolution gets stride 1 and
    every later convolution with a spatial kernel in that stage gets dilation 2 (the convention of
    ``replace_stride_with_dilation``): the receptive field is kept and the map stays at stride 16.
    That stage then runs on four times as many positions.
``"omitted"`` (default)
    The encoder stops after the stride-16 stage; the ASPP (whose rate-18 branch already spans
    about 600 input pixels) supplies the large context. Measured on EfficientNet-B0 at
    512 x 512: the encoder costs 0.85 M parameters and 1.27 G multiply-adds when the stage is
    omitted, 3.60 M and 3.56 G when it is dilated (1.90 G for MONAI's own stride-32 encoder).
    Whole network, 512 x 384 input: 0.97 M parameters and 1.23 G multiply-adds (omitted) against
    3.82 M and 3.01 G (dilated); about 60 ms against 250 ms on a 2-core CPU. The default keeps the
    method within its CPU latency target; ``"dilated"`` is there when accuracy needs the depth.

The ASPP and the decoder use depthwise-separable 3x3 convolutions as in the DeepLabv3+ paper
(``separable=True``); ``separable=False`` gives plain 3x3 convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet121, EfficientNetBN, ResNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

SEGMENTATION_ARCHITECTURE = "deeplabv3plus"
CLASSIFIER_ARCHITECTURE = "classifier"

# Norm and activation of the head; the encoder keeps MONAI's own (batch norm, swish or ReLU).
DEFAULT_NORM: tuple[str, dict[str, Any]] = ("batch", {})
DEFAULT_ACT: tuple[str, dict[str, Any]] = ("relu", {"inplace": True})

DeepestStage = Literal["dilated", "omitted"]


class NetworkError(ValueError):
    """A network cannot be built with the arguments given."""


def _separable_or_plain_conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    dilation: int,
    separable: bool,
    norm: Any,
    act: Any,
) -> nn.Module:
    """A 3x3 convolution, depthwise-separable when asked, each part followed by norm and act."""
    if not separable:
        return Convolution(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=3,
            dilation=dilation,
            adn_ordering="NA",
            norm=norm,
            act=act,
            bias=False,
        )
    return nn.Sequential(
        Convolution(  # depthwise: one 3x3 filter per channel
            spatial_dims,
            in_channels,
            in_channels,
            kernel_size=3,
            dilation=dilation,
            groups=in_channels,
            adn_ordering="NA",
            norm=norm,
            act=act,
            bias=False,
        ),
        Convolution(  # pointwise: mixes channels
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=1,
            adn_ordering="NA",
            norm=norm,
            act=act,
            bias=False,
        ),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average, 1x1 convolution, broadcast back.

    No normalisation here: after global pooling each channel has one value per image, and batch
    norm on that fails for a batch of one in training and adds little otherwise.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act: Any) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.conv = Convolution(
            spatial_dims, in_channels, out_channels, kernel_size=1, norm=None, act=act, bias=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(self.pool(x))
        return pooled.expand(-1, -1, *x.shape[2:])


class AtrousSpatialPyramidPooling(nn.Module):
    """ASPP of DeepLabv3 (Chen et al., 2017, sec. 3.3): a 1x1 branch, one 3x3 branch per atrous
    rate, an image-pooling branch; concatenated and projected by a 1x1 convolution.

    Parameters
    ----------
    spatial_dims
        Number of spatial dimensions (2 for photographs).
    in_channels, out_channels
        Channels in, and of every branch and of the projection.
    atrous_rates
        Dilations of the 3x3 branches; (6, 12, 18) at output stride 16.
    separable
        Depthwise-separable 3x3 branches (DeepLabv3+) instead of plain ones.
    dropout
        Dropout after the projection.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        atrous_rates: Sequence[int] = (6, 12, 18),
        *,
        separable: bool = True,
        dropout: float = 0.1,
        norm: Any = DEFAULT_NORM,
        act: Any = DEFAULT_ACT,
    ) -> None:
        super().__init__()
        if not atrous_rates or any(int(r) < 1 for r in atrous_rates):
            raise NetworkError(f"atrous_rates must be positive integers, got {atrous_rates!r}")
        branches: list[nn.Module] = [
            Convolution(
                spatial_dims,
                in_channels,
                out_channels,
                kernel_size=1,
                adn_ordering="NA",
                norm=norm,
                act=act,
                bias=False,
            )
        ]
        for rate in atrous_rates:
            branches.append(
                _separable_or_plain_conv(
                    spatial_dims,
                    in_channels,
                    out_channels,
                    dilation=int(rate),
                    separable=separable,
                    norm=norm,
                    act=act,
                )
            )
        branches.append(ImagePooling(spatial_dims, in_channels, out_channels, act))
        self.branches = nn.ModuleList(branches)
        self.project = Convolution(
            spatial_dims,
            out_channels * len(branches),
            out_channels,
            kernel_size=1,
            adn_ordering="NDA",
            norm=norm,
            act=act,
            dropout=dropout if dropout > 0 else None,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def _dilate_efficientnet_stage(encoder: Any, first_stack: int) -> None:
    """Turn EfficientNet stacks ``first_stack`` onwards from stride 2 into dilation 2."""
    seen_first_block = False
    for stack in list(encoder._blocks)[first_stack:]:
        for block in stack:
            conv = block._depthwise_conv
            kernel = conv.kernel_size[0]
            if not seen_first_block:
                # The block that used to downsample keeps dilation 1 (previous dilation).
                conv.stride = (1, 1)
                block.stride = 1
                dilation = 1
                seen_first_block = True
            else:
                dilation = 2
            conv.dilation = (dilation, dilation)
            # MONAI pads EfficientNet convolutions with a separate TensorFlow-style "same" padder;
            # at stride 1 "same" is symmetric: dilation * (kernel - 1) / 2 on each side.
            block._depthwise_conv_padding = nn.ZeroPad2d(dilation * (kernel - 1) // 2)


def _dilate_resnet_stage(layer: Any) -> None:
    """Turn a MONAI ResNet stage from stride 2 into dilation 2."""
    block: Any
    for index, block in enumerate(layer):
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                if module.stride != (1, 1):
                    module.stride = (1, 1)
                if index > 0 and module.kernel_size[0] > 1:
                    module.dilation = (2, 2)
                    module.padding = (module.kernel_size[0] - 1, module.kernel_size[1] - 1)
        if hasattr(block, "stride"):
            block.stride = 1
        downsample = getattr(block, "downsample", None)
        if isinstance(downsample, partial):  # shortcut type "A": strided average pool of x
            block.downsample = partial(downsample.func, **{**downsample.keywords, "stride": 1})


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ for photographs: MONAI encoder, ASPP with image pooling, stride-4 decoder.

    Parameters
    ----------
    spatial_dims
        Must be 2: photographs.
    in_channels
        Channels of the input image (3 for RGB).
    out_channels
        Classes of the label map; the method uses 3 (background, skin, lesion).
    encoder_name
        A 2D encoder registered in MONAI's ``FLEXUNET_BACKBONE`` (``efficientnet-b0`` ...
        ``efficientnet-b7``, ``resnet10``, ``resnet18``, ...). Built with ``pretrained=False``.
    deepest_stage
        ``"omitted"`` or ``"dilated"``: how output stride 16 is reached (see the module text).
    aspp_channels
        Width of each ASPP branch and of its projection.
    atrous_rates
        Dilations of ASPP's 3x3 branches.
    low_level_channels
        Channels of the projected stride-4 features (48 in the paper).
    decoder_channels
        Width of the decoder's two 3x3 convolutions.
    separable
        Depthwise-separable 3x3 convolutions in ASPP and decoder.
    dropout
        Dropout after the ASPP projection.

    Notes
    -----
    Inputs of any size work; sizes that are multiples of 32 keep every feature map aligned with
    the input (MONAI's EfficientNet pads like TensorFlow's "same" for an even input).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_name: str = "efficientnet-b0",
        *,
        deepest_stage: DeepestStage = "omitted",
        aspp_channels: int = 96,
        atrous_rates: Sequence[int] = (6, 12, 18),
        low_level_channels: int = 48,
        decoder_channels: int = 64,
        separable: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise NetworkError(f"spatial_dims must be 2 (photographs), got {spatial_dims}")
        if encoder_name not in FLEXUNET_BACKBONE.register_dict:
            known = ", ".join(sorted(FLEXUNET_BACKBONE.register_dict))
            raise NetworkError(f"unknown encoder_name {encoder_name!r}; MONAI knows: {known}")
        if deepest_stage not in ("dilated", "omitted"):
            raise NetworkError(
                f"deepest_stage must be 'dilated' or 'omitted', got {deepest_stage!r}"
            )
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("aspp_channels", aspp_channels),
            ("low_level_channels", low_level_channels),
            ("decoder_channels", decoder_channels),
        ):
            if int(value) < 1:
                raise NetworkError(f"{name} must be at least 1, got {value}")
        self.architecture_args: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "encoder_name": encoder_name,
            "deepest_stage": deepest_stage,
            "aspp_channels": aspp_channels,
            "atrous_rates": [int(r) for r in atrous_rates],
            "low_level_channels": low_level_channels,
            "decoder_channels": decoder_channels,
            "separable": separable,
            "dropout": dropout,
        }

        entry = FLEXUNET_BACKBONE.register_dict[encoder_name]
        parameters = dict(entry["parameter"])
        parameters.update(spatial_dims=2, in_channels=in_channels, pretrained=False)
        encoder = entry["type"](**parameters)
        channels: tuple[int, ...] = tuple(entry["feature_channel"])  # strides 2, 4, 8, 16, 32

        is_efficientnet = encoder_name.startswith("efficientnet")
        if is_efficientnet:
            # The classification head of EfficientNetBNFeatures is never run by its forward.
            encoder._conv_head = nn.Identity()
            encoder._conv_head_padding = nn.Identity()
            encoder._bn1 = nn.Identity()
            encoder._fc = nn.Identity()
            stride16_stacks = encoder.extract_stacks[3]  # stacks up to the stride-16 output
            if deepest_stage == "omitted":
                encoder._blocks = encoder._blocks[:stride16_stacks]
            else:
                _dilate_efficientnet_stage(encoder, stride16_stacks)
        else:
            if deepest_stage == "omitted":
                encoder.layer4 = nn.Identity()
            else:
                _dilate_resnet_stage(encoder.layer4)
        self.encoder = encoder
        high_channels = channels[3] if deepest_stage == "omitted" else channels[4]

        self.aspp = AtrousSpatialPyramidPooling(
            2, high_channels, aspp_channels, atrous_rates, separable=separable, dropout=dropout
        )
        self.low_level_projection = Convolution(
            2,
            channels[1],
            low_level_channels,
            kernel_size=1,
            adn_ordering="NA",
            norm=DEFAULT_NORM,
            act=DEFAULT_ACT,
            bias=False,
        )
        self.decoder = nn.Sequential(
            _separable_or_plain_conv(
                2,
                aspp_channels + low_level_channels,
                decoder_channels,
                dilation=1,
                separable=separable,
                norm=DEFAULT_NORM,
                act=DEFAULT_ACT,
            ),
            _separable_or_plain_conv(
                2,
                decoder_channels,
                decoder_channels,
                dilation=1,
                separable=separable,
                norm=DEFAULT_NORM,
                act=DEFAULT_ACT,
            ),
        )
        self.classifier = Convolution(
            2, decoder_channels, out_channels, kernel_size=1, conv_only=True, bias=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, out_channels, H, W)`` for an input ``(batch, C, H, W)``."""
        features = self.encoder(x)
        low_level = self.low_level_projection(features[1])  # stride 4
        high_level = self.aspp(features[-1])  # stride 16
        high_level = F.interpolate(
            high_level, size=low_level.shape[2:], mode="bilinear", align_corners=False
        )
        fused = self.decoder(torch.cat([high_level, low_level], dim=1))
        logits = self.classifier(fused)
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


CLASSIFIER_BACKBONES = ("resnet", "efficientnet-b0", "densenet121")


def build_classifier(
    num_classes: int,
    *,
    backbone: str = "resnet",
    in_channels: int = 3,
    widths: Sequence[int] = (32, 64, 128, 256),
    layers: Sequence[int] = (1, 1, 1, 1),
    dropout: float = 0.2,
) -> nn.Module:
    """A MONAI 2D classification network for the crops.

    Parameters
    ----------
    num_classes
        Number of diseases (logits out).
    backbone
        ``"resnet"`` (default): MONAI ``ResNet`` with basic blocks, ``layers`` blocks per stage and
        ``widths`` channels per stage; with the defaults a narrow ResNet-10 (about 1.2 M
        parameters, about 0.1 G multiply-adds at 128 px) that trains in minutes on a CPU.
        ``"efficientnet-b0"``: MONAI ``EfficientNetBN`` (4 M parameters). ``"densenet121"``:
        MONAI ``DenseNet121`` (7 M). None is pretrained.
    in_channels
        Channels of the crops (3 for RGB).
    widths, layers
        Only for ``"resnet"``.
    dropout
        Dropout before the last linear layer (``resnet`` and ``densenet121``).

    Returns
    -------
    torch.nn.Module
        Maps ``(batch, in_channels, S, S)`` to logits ``(batch, num_classes)``; it carries
        ``architecture_args`` so that :func:`build_network` can rebuild it from weights metadata.
    """
    if num_classes < 2:
        raise NetworkError(f"num_classes must be at least 2, got {num_classes}")
    model: nn.Module
    if backbone == "resnet":
        if len(widths) != 4 or len(layers) != 4 or min(widths) < 1 or min(layers) < 1:
            raise NetworkError(f"resnet needs four positive widths and layers: {widths}, {layers}")
        resnet = ResNet(
            block="basic",
            layers=[int(n) for n in layers],
            block_inplanes=[int(w) for w in widths],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            num_classes=num_classes,
        )
        if dropout > 0:
            resnet.fc = nn.Sequential(nn.Dropout(dropout), resnet.fc)  # type: ignore[arg-type,assignment]
        model = resnet
    elif backbone == "efficientnet-b0":
        model = EfficientNetBN(
            "efficientnet-b0",
            pretrained=False,
            spatial_dims=2,
            in_channels=in_channels,
            num_classes=num_classes,
        )
    elif backbone == "densenet121":
        model = DenseNet121(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=num_classes,
            dropout_prob=dropout,
            pretrained=False,
        )
    else:
        raise NetworkError(f"backbone must be one of {CLASSIFIER_BACKBONES}, got {backbone!r}")
    architecture_args: dict[str, Any] = {
        "num_classes": num_classes,
        "backbone": backbone,
        "in_channels": in_channels,
        "widths": [int(w) for w in widths],
        "layers": [int(n) for n in layers],
        "dropout": dropout,
    }
    # Plain attribute (not a parameter or buffer): read back by architecture_of().
    model.__dict__["architecture_args"] = architecture_args
    return model


@dataclass(frozen=True)
class ArchitectureSpec:
    """Which network and the arguments that rebuild it: what weights metadata records."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    """The spec of a network built by this module.

    Raises
    ------
    NetworkError
        When the model was not built by :class:`DeepLabV3Plus` or :func:`build_classifier`.
    """
    args = getattr(model, "architecture_args", None)
    if not isinstance(args, dict):
        raise NetworkError(
            f"{type(model).__name__} was not built by DeepLabV3Plus or build_classifier"
        )
    name = (
        SEGMENTATION_ARCHITECTURE if isinstance(model, DeepLabV3Plus) else CLASSIFIER_ARCHITECTURE
    )
    return ArchitectureSpec(name, dict(args))


def build_network(spec: ArchitectureSpec) -> nn.Module:
    """Build (with fresh weights) the network that ``spec`` describes.

    Raises
    ------
    NetworkError
        Unknown architecture or arguments it does not take.
    """
    try:
        if spec.name == SEGMENTATION_ARCHITECTURE:
            return DeepLabV3Plus(**spec.args)
        if spec.name == CLASSIFIER_ARCHITECTURE:
            args = dict(spec.args)
            return build_classifier(args.pop("num_classes"), **args)
    except (TypeError, KeyError) as exc:
        raise NetworkError(f"cannot build {spec.name} with {spec.args}: {exc}") from exc
    raise NetworkError(f"unknown architecture {spec.name!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable and frozen parameters."""
    return sum(p.numel() for p in model.parameters())


def count_multiply_adds(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass on a zero input of ``input_shape`` (batch included).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per
    multiply-add of convolutions and matrix products; grouped convolutions counted per group).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(*input_shape))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // 2)

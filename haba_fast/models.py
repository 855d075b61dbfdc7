"""Networks of the reference code (ConvNet family, MLP, LeNet, AlexNet, VGG11, ResNet18) and a functional
forward on a flat parameter vector.

Every network here has the parameter shapes and the ``parameters()`` order of the reference implementation
(GeorgeCazenavette/mtt-distillation and Huage001/DatasetFactorization, ``networks.py``), and the same
``state_dict`` keys, so the flat vector ``torch.cat([p.reshape(-1) for p in net.parameters()])`` means the same
thing in both and reference expert buffers load as they are.

Where the reference hard-codes the size of the classifier input (``Linear(16*5*5, ...)`` in LeNet, ``28*28*1 if
channel == 1 else 32*32*3`` in MLP, ``512*3*3 if channel == 1 else 512*4*4`` in ResNet18BN_AP, the ConvNet's
feature size computed from ``im_size`` with 28 read as 32), we compute it from the real feature-map size instead.
The two agree on every input size the reference runs on (1x28x28, 3x32x32, ...); on the sizes where they differ the
reference fails at its first forward, so this only adds sizes that work (e.g. the 1x8x8 ``digits`` set).
AlexNet, VGG and ResNet18 pool adaptively before the classifier, as HaBa's ``networks.py`` does (identity at the
reference sizes). A size too small for an architecture (a feature map that shrinks to nothing) is a ValueError.

The networks that end in one Linear on flattened features (ConvNet family, AlexNet, VGG, ResNet18 and its ``_AP``
variants) have ``embed(x)``: that Linear's input ``[B, D]``, the features distribution matching compares, as
``embed`` in DM's reference ``networks.py`` (VICO-UoE/DatasetCondensation). MLP and LeNet have none, as there.

Initialization uses PyTorch's default distributions (``Conv2d``/``Linear``: weight and bias uniform in
``±1/sqrt(fan_in)``, i.e. ``kaiming_uniform_(a=sqrt(5))``; norm layers weight 1, bias 0), drawn in a fixed module
order from the ``torch.Generator`` given, so a generator seed fixes the weights; the global RNG is not touched
when a generator is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from haba_fast.init import default_init_, pair

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "NETWORK_NAMES",
    "NORMS",
    "POOLINGS",
    "VGG",
    "AlexNet",
    "ConvNet",
    "ConvNetSpec",
    "LeNet",
    "ResNet",
    "build_convnet",
    "convnet_spec",
    "flatten_params",
    "functional_forward",
    "get_network",
    "num_params",
    "param_shapes",
    "unflatten_into",
]

ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")
NORMS = ("instancenorm", "groupnorm", "layernorm", "batchnorm", "none")
POOLINGS = ("avgpooling", "maxpooling", "none")

ImSize = Union[int, Sequence[int]]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _too_small(arch: str, channel: int, im_size: tuple[int, int], where: str) -> ValueError:
    return ValueError(
        f"im_size {im_size[0]}x{im_size[1]} is too small for {arch} with {channel} input channel(s): the feature map "
        f"shrinks to nothing {where}; use a larger image (e.g. 28x28 or 32x32) or a shallower network"
    )


# --------------------------------------------------------------------------------------------------------------------
# ConvNet family
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvNetSpec:
    """Everything that defines a ConvNet of the reference family (see :class:`ConvNet` for the layer math).

    Attributes:
        channel: input channels C.
        num_classes: number of logits K.
        width: channels of every conv layer (reference default 128).
        depth: number of conv blocks (reference default 3).
        norm: ``instancenorm`` | ``groupnorm`` | ``layernorm`` | ``batchnorm`` | ``none``.
        act: ``relu`` | ``sigmoid`` | ``leakyrelu``.
        pool: ``avgpooling`` | ``maxpooling`` | ``none``.
        im_size: input (H, W).
    """

    channel: int
    num_classes: int
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    act: str = "relu"
    pool: str = "avgpooling"
    im_size: tuple[int, int] = (32, 32)

    def __post_init__(self) -> None:
        _check_positive("channel", self.channel)
        _check_positive("num_classes", self.num_classes)
        _check_positive("width", self.width)
        _check_positive("depth", self.depth)
        if self.norm not in NORMS:
            raise ValueError(f"unknown ConvNet norm {self.norm!r}; valid: {', '.join(NORMS)}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown ConvNet activation {self.act!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.pool not in POOLINGS:
            raise ValueError(f"unknown ConvNet pooling {self.pool!r}; valid: {', '.join(POOLINGS)}")
        if self.norm == "groupnorm" and self.width % 4:
            raise ValueError(f"norm 'groupnorm' uses 4 groups: width must be a multiple of 4, got {self.width}")
        object.__setattr__(self, "im_size", pair(self.im_size))
        # Fails early (ValueError) when the image is too small for this depth.
        self.layer_sizes()

    @property
    def first_padding(self) -> int:
        """Padding of the first conv: 3 when the input has one channel (28x28 -> 32x32), else 1 (reference rule)."""
        return 3 if self.channel == 1 else 1

    def layer_sizes(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Spatial sizes per block: ``[((H_conv, W_conv), (H_out, W_out)), ...]`` (after the conv, after the pool)."""
        h, w = self.im_size
        sizes = []
        for d in range(self.depth):
            pad = self.first_padding if d == 0 else 1
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            conv = (h, w)
            if self.pool != "none":
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise _too_small(f"a depth-{self.depth} ConvNet", self.channel, self.im_size, f"after block {d + 1}")
            sizes.append((conv, (h, w)))
        return sizes

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Shape ``(width, h, w)`` of the last block's output, the classifier's input before flattening."""
        h, w = self.layer_sizes()[-1][1]
        return (self.width, h, w)

    @property
    def num_features(self) -> int:
        """Input features of the classifier: ``width * h * w``."""
        c, h, w = self.feature_shape
        return c * h * w


def _norm_layer(norm: str, shape: tuple[int, int, int]) -> nn.Module | None:
    c = shape[0]
    if norm == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    if norm == "layernorm":
        return nn.LayerNorm(list(shape), elementwise_affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(c, affine=True)
    return None


def _activation(act: str) -> nn.Module:
    # Not in-place (the reference's ReLU is): no parameters change, and double backward stays simple.
    if act == "relu":
        return nn.ReLU()
    if act == "sigmoid":
        return nn.Sigmoid()
    return nn.LeakyReLU(negative_slope=0.01)


def _pooling(pool: str) -> nn.Module | None:
    if pool == "avgpooling":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if pool == "maxpooling":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return None


class _Net(nn.Module):
    """Common input check: every network knows its input shape ``(channel, H, W)``."""

    channel: int
    num_classes: int
    im_size: tuple[int, int]

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channel or tuple(x.shape[2:]) != self.im_size:
            raise ValueError(
                f"{type(self).__name__} was built for inputs [B, {self.channel}, {self.im_size[0]}, "
                f"{self.im_size[1]}], got {list(x.shape)}; build it with the data's channel and im_size"
            )


class _EmbedNet(_Net):
    """A network that is features -> flatten -> one Linear: ``forward(x) = head(embed(x))``.

    ``embed`` is what DM's reference ``networks.py`` (VICO-UoE/DatasetCondensation) calls ``embed`` for its ConvNet,
    AlexNet, VGG and ResNet: the same layers as ``forward``, in the same order, stopping before the final Linear.
    Subclasses define :meth:`_features` (everything before the flatten) and name their final Linear in
    ``_head_name`` (the reference's module name, ``classifier`` or ``fc``, kept for the ``state_dict`` keys).
    """

    _head_name = "classifier"

    @property
    def head(self) -> nn.Linear:
        """The final Linear ``[D -> num_classes]`` (``classifier``, or ``fc`` in AlexNet)."""
        return getattr(self, self._head_name)

    def _features(self, x: Tensor) -> Tensor:
        """Feature map ``[B, c, h, w]`` of a checked input, the one ``head`` reads after flattening."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """Features ``[B, D]`` (``D = head.in_features``) of images ``x`` ``[B, channel, H, W]``: the input of the
        final Linear, flattened in (c, h, w) order."""
        self._check_input(x)
        return self._features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``x`` ``[B, channel, H, W]``."""
        return self.head(self.embed(x))


class ConvNet(_EmbedNet):
    """The reference ConvNet: ``depth`` blocks of conv -> norm -> act -> pool, then one Linear classifier.

    Layer math for input x [B, C, H, W] (``spec`` = :class:`ConvNetSpec`), block d = 0 .. depth-1:

    - conv: ``Conv2d(C_in, width, 3, stride 1, padding p_d, bias)`` with ``p_0 = 3 if C == 1 else 1`` and
      ``p_d = 1`` for d > 0 (so 1x28x28 becomes 32x32; 1x8x8 becomes 12x12), i.e. ``H <- H + 2 p_d - 2``.
    - norm (omitted for ``none``), all with eps 1e-5 and affine weight/bias of shape [width] (layernorm: [width,
      H, W]): ``instancenorm`` = GroupNorm(width groups) = per-sample, per-channel mean/biased-variance over
      (H, W); ``groupnorm`` = GroupNorm(4 groups); ``layernorm`` = LayerNorm over (width, H, W) of the conv output
      (elementwise affine); ``batchnorm`` = BatchNorm2d (per channel over (B, H, W); running statistics
      momentum 0.1; :func:`functional_forward` always uses the batch statistics).
    - act: ``relu``, ``sigmoid``, ``leakyrelu`` (slope 0.01).
    - pool (omitted for ``none``): 2x2 stride 2 average or max, ``H <- floor(H / 2)``.

    Then flatten in (C, H, W) order (``embed``, ``[B, width*h*w]``) and ``Linear(width * h * w, num_classes)``.

    Modules (and so ``parameters()`` / ``state_dict`` order) as in the reference: ``features`` (an
    ``nn.Sequential`` of [conv, norm?, act, pool?] per block) and ``classifier``; per block the parameters are
    conv weight [width, C_in, 3, 3], conv bias [width], then norm weight and bias when there is a norm; last the
    classifier weight [K, width*h*w] and bias [K].
    """

    def __init__(self, spec: ConvNetSpec):
        super().__init__()
        self.spec = spec
        self.channel, self.num_classes, self.im_size = spec.channel, spec.num_classes, spec.im_size
        layers: list[nn.Module] = []
        in_channels = spec.channel
        for d, (conv_size, _) in enumerate(spec.layer_sizes()):
            pad = spec.first_padding if d == 0 else 1
            layers.append(nn.Conv2d(in_channels, spec.width, kernel_size=3, padding=pad))
            norm = _norm_layer(spec.norm, (spec.width, *conv_size))
            if norm is not None:
                layers.append(norm)
            layers.append(_activation(spec.act))
            pool = _pooling(spec.pool)
            if pool is not None:
                layers.append(pool)
            in_channels = spec.width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(spec.num_features, spec.num_classes)

    def _features(self, x: Tensor) -> Tensor:
        return self.features(x)


def build_convnet(
    spec: ConvNetSpec,
    generator: torch.Generator | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> ConvNet:
    """Build and initialize a :class:`ConvNet` from its spec (initialization from ``generator``; see module doc)."""
    if not isinstance(spec, ConvNetSpec):
        raise TypeError(f"spec must be a ConvNetSpec, got {type(spec).__name__}")
    return _build(lambda: ConvNet(spec), generator, device, dtype)


def convnet_spec(net: nn.Module) -> ConvNetSpec | None:
    """The :class:`ConvNetSpec` of a ConvNet-family network, or None for any other network."""
    return net.spec if isinstance(net, ConvNet) else None


# name -> overrides of the default ConvNet (width 128, depth 3, instancenorm, relu, avgpooling), as the reference's
# get_network defines its variants.
_CONVNET_VARIANTS: dict[str, dict] = {"ConvNet": {}}
_CONVNET_VARIANTS.update({f"ConvNetD{d}": {"depth": d} for d in range(1, 9)})
_CONVNET_VARIANTS.update({f"ConvNetW{w}": {"width": w} for w in (32, 64, 128, 256, 512, 1024)})
_CONVNET_VARIANTS["ConvNetKIP"] = {"width": 1024, "norm": "none"}
_CONVNET_VARIANTS.update(
    {"ConvNetAS": {"act": "sigmoid"}, "ConvNetAR": {"act": "relu"}, "ConvNetAL": {"act": "leakyrelu"}}
)
_CONVNET_VARIANTS.update(
    {
        "ConvNetNN": {"norm": "none"},
        "ConvNetBN": {"norm": "batchnorm"},
        "ConvNetLN": {"norm": "layernorm"},
        "ConvNetIN": {"norm": "instancenorm"},
        "ConvNetGN": {"norm": "groupnorm"},
    }
)
_CONVNET_VARIANTS.update(
    {"ConvNetNP": {"pool": "none"}, "ConvNetMP": {"pool": "maxpooling"}, "ConvNetAP": {"pool": "avgpooling"}}
)


# --------------------------------------------------------------------------------------------------------------------
# Other reference architectures
# --------------------------------------------------------------------------------------------------------------------


def _conv_out(size: int, kernel: int, padding: int) -> int:
    return size + 2 * padding - kernel + 1


class MLP(_Net):
    """Three Linear layers (128, 128, K) with ReLU on the flattened image.

    The reference sizes ``fc_1`` as ``28*28*1 if channel == 1 else 32*32*3``; here it is ``channel*H*W`` (equal at
    those sizes). Parameters: fc_1, fc_2, fc_3 (weight, bias each). No ``embed``, as in DM's reference (so DM
    refuses it).
    """

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__()
        self.channel, self.num_classes, self.im_size = channel, num_classes, im_size
        self.fc_1 = nn.Linear(channel * im_size[0] * im_size[1], 128)
        self.fc_2 = nn.Linear(128, 128)
        self.fc_3 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, K]`` of ``x`` ``[B, channel, H, W]``."""
        self._check_input(x)
        out = F.relu(self.fc_1(x.flatten(1)))
        out = F.relu(self.fc_2(out))
        return self.fc_3(out)


class LeNet(_Net):
    """LeNet-5: conv5 (6, padding 2 when channel == 1) -> ReLU -> maxpool -> conv5 (16) -> ReLU -> maxpool ->
    Linear 120 -> ReLU -> Linear 84 -> ReLU -> Linear K.

    Parameters: features.0, features.3, fc_1, fc_2, fc_3. ``fc_1`` takes ``16*h*w`` features (the reference's
    ``16*5*5`` at 1x28x28 and 3x32x32). No ``embed``, as in DM's reference (so DM refuses it).
    """

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__()
        self.channel, self.num_classes, self.im_size = channel, num_classes, im_size
        pad = 2 if channel == 1 else 0
        hw = []
        for s in im_size:
            s = _conv_out(s, 5, pad) // 2
            s = (_conv_out(s, 5, 0) // 2) if s >= 5 else 0
            hw.append(s)
        if min(hw) < 1:
            raise _too_small("LeNet", channel, im_size, "after its second conv/pool")
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, kernel_size=5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.fc_1 = nn.Linear(16 * hw[0] * hw[1], 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, K]`` of ``x`` ``[B, channel, H, W]``."""
        self._check_input(x)
        out = self.features(x).flatten(1)
        out = F.relu(self.fc_1(out))
        out = F.relu(self.fc_2(out))
        return self.fc_3(out)


class AlexNet(_EmbedNet):
    """The reference's small AlexNet: conv5 128 (padding 4 when channel == 1, else 2) -> ReLU -> maxpool ->
    conv5 192 -> ReLU -> maxpool -> conv3 256 -> ReLU -> conv3 192 -> ReLU -> conv3 192 -> ReLU -> maxpool ->
    adaptive average pool to 4x4 (HaBa's version; identity at 28x28/32x32) -> flatten (``embed``, ``[B, 3072]``)
    -> Linear(192*4*4, K).

    Parameters: features.0, .3, .6, .8, .10 (weight, bias each), then fc.
    """

    _head_name = "fc"

    def __init__(self, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32)):
        super().__init__()
        self.channel, self.num_classes, self.im_size = channel, num_classes, im_size
        pad = 4 if channel == 1 else 2
        for s in im_size:
            s = _conv_out(s, 5, pad) // 2
            s = _conv_out(s, 5, 2) // 2
            if s // 2 < 1:
                raise _too_small("AlexNet", channel, im_size, "after its third max-pool")
        self.features = nn.Sequential(
            nn.Conv2d(channel, 128, kernel_size=5, stride=1, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(192 * 4 * 4, num_classes)

    def _features(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x))


_VGG_CFG = {
    "VGG11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "VGG19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(_EmbedNet):
    """The reference VGG: per config entry conv3 (padding 3 on the first conv when channel == 1, else 1) -> norm
    (GroupNorm(c, c) "instancenorm", or BatchNorm2d) -> ReLU, or a 2x2 max-pool for "M"; then adaptive average
    pool to 1x1 (HaBa's version; identity at 28x28/32x32), flatten (``embed``, ``[B, 512]``) and Linear(512, K).

    Parameters: per conv entry conv weight, bias, norm weight, bias (``features.{i}``), then classifier.
    """

    def __init__(
        self, name: str, channel: int, num_classes: int, im_size: tuple[int, int] = (32, 32), norm: str = "instancenorm"
    ):
        super().__init__()
        self.channel, self.num_classes, self.im_size = channel, num_classes, im_size
        cfg = _VGG_CFG[name]
        h, w = im_size
        layers: list[nn.Module] = []
        in_channels = channel
        for i, v in enumerate(cfg):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = h // 2, w // 2
                if h < 1 or w < 1:
                    raise _too_small(name, channel, im_size, f"at max-pool {cfg[: i + 1].count('M')}")
            else:
                pad = 3 if channel == 1 and i == 0 else 1
                h, w = _conv_out(h, 3, pad), _conv_out(w, 3, pad)
                norm_layer = nn.GroupNorm(v, v, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(v)
                layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=pad), norm_layer, nn.ReLU()]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def _features(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x))


def _res_norm(norm: str, c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(c)


class _BasicBlock(nn.Module):
    """ResNet basic block. ``ap=False``: stride-``stride`` convs (standard). ``ap=True`` (the reference's ``_AP``
    variant): stride-1 convs, a 2x2 average pool after the first conv and in the shortcut when ``stride != 1``.
    Parameters: conv1, bn1, conv2, bn2, then the shortcut's conv and norm when there is one (no conv biases).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, ap: bool):
        super().__init__()
        self.stride, self.ap = stride, ap
        conv_stride = 1 if ap else stride
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = _res_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _res_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if ap:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, bias=False),
                    nn.AvgPool2d(kernel_size=2, stride=2),
                    _res_norm(norm, planes),
                )
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), _res_norm(norm, planes)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.ap and self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(_EmbedNet):
    """ResNet18 of the reference (CIFAR stem: conv3 64, stride 1, padding 1, no bias -> norm -> ReLU), four stages
    of two basic blocks (64, 128, 256, 512; stride 1, 2, 2, 2), then:

    - ``ap=False`` (``ResNet18``, ``ResNet18BN``): adaptive average pool to 1x1 (HaBa's version; the same as the
      MTT version's ``avg_pool2d(4)`` at 28x28/32x32) and Linear(512, K);
    - ``ap=True`` (``ResNet18_AP``, ``ResNet18BN_AP``): strided convs replaced by stride-1 convs + 2x2 average
      pools, no final pooling, Linear(512*h*w, K) (the reference's ``512*3*3`` for 28x28, ``512*4*4`` for 32x32).

    ``embed`` is the flattened input of that Linear (``[B, 512]``, or ``[B, 512*h*w]`` with ``ap``).
    norm ``instancenorm`` = GroupNorm(c, c), ``batchnorm`` = BatchNorm2d. Parameter order: conv1, bn1,
    layer1..layer4 (blocks in order), classifier.
    """

    def __init__(
        self,
        channel: int,
        num_classes: int,
        im_size: tuple[int, int] = (32, 32),
        norm: str = "instancenorm",
        ap: bool = False,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
    ):
        super().__init__()
        self.channel, self.num_classes, self.im_size, self.ap = channel, num_classes, im_size, ap
        h, w = im_size
        for _ in range(3):  # three stride-2 stages
            h, w = (h // 2, w // 2) if ap else ((h - 1) // 2 + 1, (w - 1) // 2 + 1)
            if h < 1 or w < 1:
                raise _too_small("ResNet18", channel, im_size, "in its stride-2 stages")
        self.conv1 = nn.Conv2d(channel, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _res_norm(norm, 64)
        in_planes = 64
        for i, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
            blocks = []
            for s in [stride] + [1] * (num_blocks[i] - 1):
                blocks.append(_BasicBlock(in_planes, planes, s, norm, ap))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = None if ap else nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512 * h * w if ap else 512, num_classes)

    def _features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return out if self.pool is None else self.pool(out)


# --------------------------------------------------------------------------------------------------------------------
# Construction, initialization, registry
# --------------------------------------------------------------------------------------------------------------------


def _build(
    make: Callable[[], nn.Module],
    generator: torch.Generator | None,
    device: str | torch.device | None,
    dtype: torch.dtype,
) -> nn.Module:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    # Build on the meta device so that the modules' own reset_parameters() draw nothing from the global RNG,
    # then materialize and draw every weight (in float32, so a seed gives the same values for every dtype) from
    # the generator, on the generator's device.
    init_device = generator.device if generator is not None else torch.device("cpu")
    with torch.device("meta"):
        net = make()
    if device is not None and torch.device(device).type == "meta":
        return net.to(dtype=dtype)  # shapes only (cheap inspection of big networks): nothing to initialize
    net = net.to_empty(device=init_device)
    default_init_(net, generator)
    return net.to(device=device if device is not None else init_device, dtype=dtype)


def _convnet_maker(overrides: dict) -> Callable[[int, int, tuple[int, int]], nn.Module]:
    def make(channel: int, num_classes: int, im_size: tuple[int, int]) -> nn.Module:
        return ConvNet(ConvNetSpec(channel=channel, num_classes=num_classes, im_size=im_size, **overrides))

    return make


_REGISTRY: dict[str, Callable[[int, int, tuple[int, int]], nn.Module]] = {
    name: _convnet_maker(ov) for name, ov in _CONVNET_VARIANTS.items()
}
_REGISTRY.update(
    {
        "MLP": lambda c, k, s: MLP(c, k, s),
        "LeNet": lambda c, k, s: LeNet(c, k, s),
        "AlexNet": lambda c, k, s: AlexNet(c, k, s),
        "VGG11": lambda c, k, s: VGG("VGG11", c, k, s, norm="instancenorm"),
        "VGG11BN": lambda c, k, s: VGG("VGG11", c, k, s, norm="batchnorm"),
        "ResNet18": lambda c, k, s: ResNet(c, k, s, norm="instancenorm"),
        "ResNet18BN": lambda c, k, s: ResNet(c, k, s, norm="batchnorm"),
        "ResNet18_AP": lambda c, k, s: ResNet(c, k, s, norm="instancenorm", ap=True),
        "ResNet18BN_AP": lambda c, k, s: ResNet(c, k, s, norm="batchnorm", ap=True),
    }
)

NETWORK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_network(
    name: str,
    channel: int,
    num_classes: int,
    im_size: ImSize = (32, 32),
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build a network of the reference code by name, initialized from ``generator``.

    Args:
        name: one of :data:`NETWORK_NAMES` (``ConvNet``, ``ConvNetD1``..``D8``, ``ConvNetW32``..``W1024``,
            ``ConvNetKIP``, ``ConvNetNN/BN/LN/IN/GN``, ``ConvNetAS/AR/AL``, ``ConvNetNP/MP/AP``, ``MLP``, ``LeNet``,
            ``AlexNet``, ``VGG11``, ``VGG11BN``, ``ResNet18``, ``ResNet18BN``, ``ResNet18_AP``, ``ResNet18BN_AP``).
        channel: input channels C.
        num_classes: number of logits K.
        im_size: input (H, W) (or an int for square images). Unlike the reference (whose width/norm/act/pool
            ConvNet variants ignore it and assume 32x32), every network is sized for it.
        generator: the source of the initial weights (None: the global RNG, as PyTorch does).
        device: where the network lives (default: the generator's device, else CPU); ``"meta"`` gives an
            uninitialized network with the right shapes, for cheap inspection.
        dtype: floating dtype of parameters and buffers.

    Returns:
        The network (train mode); its forward maps ``[B, C, H, W]`` to logits ``[B, K]``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), non-positive sizes, or an image too small for
            the architecture.
        TypeError: a non-floating dtype or a generator that is not a ``torch.Generator``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(NETWORK_NAMES)}")
    _check_positive("channel", channel)
    _check_positive("num_classes", num_classes)
    size = pair(im_size)
    return _build(lambda: _REGISTRY[name](channel, num_classes, size), generator, device, dtype)


# --------------------------------------------------------------------------------------------------------------------
# Flat parameter vectors and the functional forward
# --------------------------------------------------------------------------------------------------------------------


def num_params(net: nn.Module) -> int:
    """P, the number of scalars in ``net.parameters()`` (the length of a flat vector)."""
    return sum(p.numel() for p in net.parameters())


def param_shapes(net: nn.Module) -> list[tuple[str, torch.Size]]:
    """``(name, shape)`` of every parameter, in ``parameters()`` order (the layout of a flat vector)."""
    return [(n, p.shape) for n, p in net.named_parameters()]


def flatten_params(net: nn.Module) -> Tensor:
    """The flat parameter vector ``[P]``: ``torch.cat([p.reshape(-1) for p in net.parameters()])``, detached (a
    new tensor, not a view of the parameters)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _check_flat(net: nn.Module, w: Tensor) -> int:
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor [P], got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating tensor, got dtype {w.dtype}")
    p = num_params(net)
    if w.dim() != 1 or w.numel() != p:
        raise ValueError(
            f"w must be a flat parameter vector of shape [{p}] for this {type(net).__name__}, got {list(w.shape)}"
        )
    return p


@torch.no_grad()
def unflatten_into(net: nn.Module, w: Tensor) -> None:
    """Copy a flat vector ``w`` ``[P]`` into ``net``'s parameters (in place, no autograd; dtype/device converted)."""
    _check_flat(net, w)
    offset = 0
    for p in net.parameters():
        n = p.numel()
        p.copy_(w[offset : offset + n].view_as(p))
        offset += n


def functional_forward(net: nn.Module, w: Tensor, x: Tensor) -> Tensor:
    """Logits of ``net`` with its parameters replaced by views of a flat vector.

    Differentiable in ``w`` and ``x`` (also twice: ``create_graph=True`` works). ``net``'s own parameters and
    buffers are neither used nor changed. BatchNorm layers always normalize with the batch statistics (as in train
    mode) and do not update their running statistics, whatever ``net.training`` is: the unrolled student steps
    of trajectory matching train the network, and must not have side effects.

    Args:
        net: a network (any ``nn.Module``; its parameter layout defines P).
        w: flat parameters ``[P]`` in ``parameters()`` order (see :func:`flatten_params`).
        x: inputs ``[B, C, H, W]``.

    Returns:
        Logits ``[B, K]``.
    """
    _check_flat(net, w)
    params: dict[str, Tensor | None] = {}
    offset = 0
    for name, p in net.named_parameters():
        n = p.numel()
        params[name] = w[offset : offset + n].view(p.shape)
        offset += n
    for mod_name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            prefix = f"{mod_name}." if mod_name else ""
            # No running statistics: BatchNorm then uses batch statistics in any mode and updates nothing.
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                params[prefix + buf] = None
    return torch.func.functional_call(net, params, (x,))

"""Tests of haba_fast.models: reference parameter layouts, the functional forward, initialization, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close, devices, requires_cuda

from haba_fast.models import (
    NETWORK_NAMES,
    ConvNet,
    ConvNetSpec,
    build_convnet,
    convnet_spec,
    flatten_params,
    functional_forward,
    get_network,
    num_params,
    param_shapes,
    unflatten_into,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CONVNET_NAMES = [n for n in NETWORK_NAMES if n.startswith("ConvNet")]
OTHER_NAMES = [n for n in NETWORK_NAMES if not n.startswith("ConvNet")]
# Names the reference's get_network defines (issue 2 lists them); all must exist here.
REFERENCE_NAMES = (
    ["ConvNet", "MLP", "LeNet", "AlexNet", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN_AP", "ResNet18_AP"]
    + [f"ConvNetD{d}" for d in range(1, 9)]
    + [f"ConvNetW{w}" for w in (32, 64, 128, 256, 512, 1024)]
    + ["ConvNetKIP", "ConvNetAS", "ConvNetAR", "ConvNetAL", "ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN"]
    + ["ConvNetGN", "ConvNetNP", "ConvNetMP", "ConvNetAP"]
)


# ---------------------------------------------------------------------------------------------------------------
# Independent expectations for the ConvNet layout (written from the reference's layer list, not from models.py)
# ---------------------------------------------------------------------------------------------------------------


def expected_convnet_shapes(c, k, width, depth, norm, pool, hw):
    """Parameter shapes in reference order: per block conv w, conv b, [norm w, norm b]; then classifier."""
    h, w = hw
    shapes = []
    cin = c
    for d in range(depth):
        pad = 3 if (c == 1 and d == 0) else 1
        h, w = h + 2 * pad - 2, w + 2 * pad - 2
        shapes += [(width, cin, 3, 3), (width,)]
        if norm == "layernorm":
            shapes += [(width, h, w), (width, h, w)]
        elif norm != "none":
            shapes += [(width,), (width,)]
        if pool != "none":
            h, w = h // 2, w // 2
        cin = width
    shapes += [(k, width * h * w), (k,)]
    return shapes


def reference_num_feat(c, width, depth, pool, hw):
    """The reference's own rule for the classifier input (im_size 28 read as 32, halve per pool)."""
    h, w = (32, 32) if hw[0] == 28 else hw
    for _ in range(depth):
        if pool != "none":
            h, w = h // 2, w // 2
    return width * h * w


VARIANT = {  # name -> (width, depth, norm, act, pool)
    "ConvNet": (128, 3, "instancenorm", "relu", "avgpooling"),
    "ConvNetD1": (128, 1, "instancenorm", "relu", "avgpooling"),
    "ConvNetD2": (128, 2, "instancenorm", "relu", "avgpooling"),
    "ConvNetD4": (128, 4, "instancenorm", "relu", "avgpooling"),
    "ConvNetD5": (128, 5, "instancenorm", "relu", "avgpooling"),
    "ConvNetW32": (32, 3, "instancenorm", "relu", "avgpooling"),
    "ConvNetW64": (64, 3, "instancenorm", "relu", "avgpooling"),
    "ConvNetW256": (256, 3, "instancenorm", "relu", "avgpooling"),
    "ConvNetNN": (128, 3, "none", "relu", "avgpooling"),
    "ConvNetBN": (128, 3, "batchnorm", "relu", "avgpooling"),
    "ConvNetLN": (128, 3, "layernorm", "relu", "avgpooling"),
    "ConvNetIN": (128, 3, "instancenorm", "relu", "avgpooling"),
    "ConvNetGN": (128, 3, "groupnorm", "relu", "avgpooling"),
    "ConvNetAS": (128, 3, "instancenorm", "sigmoid", "avgpooling"),
    "ConvNetAL": (128, 3, "instancenorm", "leakyrelu", "avgpooling"),
    "ConvNetNP": (128, 3, "instancenorm", "relu", "none"),
    "ConvNetMP": (128, 3, "instancenorm", "relu", "maxpooling"),
    "ConvNetKIP": (1024, 3, "none", "relu", "avgpooling"),
}


def test_all_reference_names_exist():
    missing = [n for n in REFERENCE_NAMES if n not in NETWORK_NAMES]
    assert not missing


@pytest.mark.parametrize(
    "c,hw,k,expected",
    [
        # 3x32x32: conv 3*128*9+128 = 3584, GN 256, 2 x (128*128*9+128 + 256) = 2*147840, fc 128*4*4*10+10 = 20490
        (3, (32, 32), 10, 320_010),
        # 1x28x28 (padding 3 -> 32x32): 1280 + 256 + 2*147840 + 20490
        (1, (28, 28), 10, 317_706),
        # 1x8x8 (digits; padding 3 -> 12 -> 6 -> 3 -> 1): 1280 + 256 + 2*147840 + 128*10+10
        (1, (8, 8), 10, 298_506),
        # 3x32x32, 100 classes: 3584 + 256 + 2*147840 + 2048*100+100
        (3, (32, 32), 100, 504_420),
    ],
)
def test_convnet_param_count_by_hand(c, hw, k, expected):
    net = get_network("ConvNet", c, k, hw, generator=gen())
    assert num_params(net) == expected
    assert flatten_params(net).shape == (expected,)


@pytest.mark.parametrize("name", sorted(VARIANT))
@pytest.mark.parametrize("c,hw", [(3, (32, 32)), (1, (28, 28)), (1, (32, 32)), (3, (17, 23))])
def test_convnet_shapes_and_order(name, c, hw):
    width, depth, norm, act, pool = VARIANT[name]
    if name == "ConvNetKIP" and hw != (32, 32):
        pytest.skip("one size is enough for the 19M-parameter variant")
    expected = expected_convnet_shapes(c, 7, width, depth, norm, pool, hw)
    if any(s == 0 for shape in expected for s in shape):
        with pytest.raises(ValueError, match="too small"):
            get_network(name, c, 7, hw, generator=gen())
        return
    net = get_network(name, c, 7, hw, generator=gen())
    assert [tuple(p.shape) for p in net.parameters()] == expected
    assert num_params(net) == sum(torch.Size(s).numel() for s in expected)
    spec = convnet_spec(net)
    assert (spec.width, spec.depth, spec.norm, spec.act, spec.pool) == (width, depth, norm, act, pool)
    assert (spec.channel, spec.num_classes, spec.im_size) == (c, 7, hw)
    # At the reference's own sizes (MNIST-like 1x28x28, CIFAR-like 3x32x32) its shape rule gives our classifier.
    if (c, hw) in ((1, (28, 28)), (3, (32, 32))):
        assert net.classifier.in_features == reference_num_feat(c, width, depth, pool, hw)


def test_convnet_state_dict_keys_match_reference():
    # Reference: features = Sequential(conv, norm, act, pool) per block, then classifier.
    keys = list(get_network("ConvNet", 3, 10, generator=gen()).state_dict())
    assert keys == [
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias",
        "features.8.weight", "features.8.bias", "features.9.weight", "features.9.bias",
        "classifier.weight", "classifier.bias",
    ]  # fmt: skip
    nn_keys = [k for k, _ in param_shapes(get_network("ConvNetNN", 3, 10, generator=gen()))]
    assert nn_keys[:4] == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
    bn_keys = list(get_network("ConvNetBN", 3, 10, generator=gen()).state_dict())
    assert "features.1.running_mean" in bn_keys and "features.1.num_batches_tracked" in bn_keys


@pytest.mark.parametrize(
    "c,hw,first_pad,sizes",
    [
        (1, (28, 28), 3, [((32, 32), (16, 16)), ((16, 16), (8, 8)), ((8, 8), (4, 4))]),
        (1, (8, 8), 3, [((12, 12), (6, 6)), ((6, 6), (3, 3)), ((3, 3), (1, 1))]),
        (3, (32, 32), 1, [((32, 32), (16, 16)), ((16, 16), (8, 8)), ((8, 8), (4, 4))]),
        (3, (8, 8), 1, [((8, 8), (4, 4)), ((4, 4), (2, 2)), ((2, 2), (1, 1))]),
    ],
)
def test_convnet_padding_rule(c, hw, first_pad, sizes):
    spec = ConvNetSpec(channel=c, num_classes=10, im_size=hw)
    assert spec.first_padding == first_pad
    assert spec.layer_sizes() == sizes
    net = build_convnet(spec, gen())
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [m.padding for m in convs] == [(first_pad, first_pad), (1, 1), (1, 1)]
    assert spec.feature_shape == (128, *sizes[-1][1])


def convnet_by_hand(params, x, spec):
    """Independent ConvNet forward from the documented layer math (the oracle; also what the C++ engine does)."""
    it = iter(params)
    out = x
    for d in range(spec.depth):
        wgt, b = next(it), next(it)
        out = F.conv2d(out, wgt, b, padding=(3 if spec.channel == 1 and d == 0 else 1))
        if spec.norm != "none":
            g, beta = next(it), next(it)
            if spec.norm == "layernorm":
                dims = (1, 2, 3)
                mu, var = out.mean(dims, keepdim=True), out.var(dims, unbiased=False, keepdim=True)
                out = (out - mu) / torch.sqrt(var + 1e-5) * g + beta
            else:
                n, ch, h, w = out.shape
                groups = {"instancenorm": ch, "groupnorm": 4, "batchnorm": None}[spec.norm]
                if groups is None:  # batch statistics per channel
                    mu = out.mean((0, 2, 3), keepdim=True)
                    var = out.var((0, 2, 3), unbiased=False, keepdim=True)
                    out = (out - mu) / torch.sqrt(var + 1e-5)
                else:
                    o = out.reshape(n, groups, -1)
                    mu, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
                    out = ((o - mu) / torch.sqrt(var + 1e-5)).reshape(n, ch, h, w)
                out = out * g.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        out = {"relu": torch.relu, "sigmoid": torch.sigmoid, "leakyrelu": lambda t: F.leaky_relu(t, 0.01)}[spec.act](
            out
        )
        if spec.pool == "avgpooling":
            out = F.avg_pool2d(out, 2)
        elif spec.pool == "maxpooling":
            out = F.max_pool2d(out, 2)
    wc, bc = next(it), next(it)
    return out.flatten(1) @ wc.t() + bc


@pytest.mark.parametrize("norm", ["instancenorm", "groupnorm", "layernorm", "batchnorm", "none"])
@pytest.mark.parametrize("act,pool", [("relu", "avgpooling"), ("sigmoid", "maxpooling"), ("leakyrelu", "none")])
@pytest.mark.parametrize("c,hw", [(1, (8, 8)), (3, (11, 13))])
def test_convnet_matches_hand_written_forward(norm, act, pool, c, hw):
    spec = ConvNetSpec(channel=c, num_classes=5, width=8, depth=2, norm=norm, act=act, pool=pool, im_size=hw)
    net = build_convnet(spec, gen(1), dtype=torch.float64)
    x = torch.randn(3, c, *hw, dtype=torch.float64, generator=gen(2))
    expected = convnet_by_hand(list(net.parameters()), x, spec)
    assert_close(net(x), expected)
    assert_close(functional_forward(net, flatten_params(net), x), expected)


# ---------------------------------------------------------------------------------------------------------------
# Other architectures: counts and names against hand-derived reference values
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,c,hw,expected",
    [
        ("MLP", 3, (32, 32), 3072 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10),
        ("MLP", 1, (28, 28), 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10),
        ("LeNet", 1, (28, 28), (25 * 6 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + 850),
        ("LeNet", 3, (32, 32), (75 * 6 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + 850),
        (
            "AlexNet",
            3,
            (32, 32),
            (3 * 128 * 25 + 128)
            + (128 * 192 * 25 + 192)
            + (192 * 256 * 9 + 256)
            + (256 * 192 * 9 + 192)
            + (192 * 192 * 9 + 192)
            + (192 * 16 * 10 + 10),
        ),
        ("VGG11", 3, (32, 32), 9_231_114),  # the well-known CIFAR VGG11 count (GroupNorm has BN's 2 per channel)
        ("VGG11BN", 1, (28, 28), 9_231_114 - 2 * 64 * 9),
        ("ResNet18", 3, (32, 32), 11_173_962),  # the well-known CIFAR ResNet18 count
        ("ResNet18BN_AP", 3, (32, 32), 11_173_962 - 5130 + (512 * 16 * 10 + 10)),  # Linear(512*4*4, 10)
        ("ResNet18BN_AP", 1, (28, 28), 11_173_962 - 2 * 64 * 9 - 5130 + (512 * 9 * 10 + 10)),  # Linear(512*3*3, 10)
    ],
)
def test_other_param_counts(name, c, hw, expected):
    # Shapes only: on the meta device nothing is allocated or initialized (these nets have millions of weights).
    assert num_params(get_network(name, c, 10, hw, device="meta")) == expected


def test_resnet_parameter_names_in_reference_order():
    names = [n for n, _ in param_shapes(get_network("ResNet18BN_AP", 3, 10, device="meta"))]
    assert names[:6] == [
        "conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias",
    ]  # fmt: skip
    assert "layer2.0.shortcut.0.weight" in names and "layer2.0.shortcut.2.weight" in names  # conv, avgpool, norm
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    plain = [n for n, _ in param_shapes(get_network("ResNet18", 3, 10, device="meta"))]
    assert "layer2.0.shortcut.1.weight" in plain  # conv, norm
    lenet = [n for n, _ in param_shapes(get_network("LeNet", 1, 10, (28, 28), generator=gen()))]
    assert lenet[:4] == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
    alex = [n for n, _ in param_shapes(get_network("AlexNet", 3, 10, device="meta"))]
    assert alex[-2:] == ["fc.weight", "fc.bias"] and alex[8] == "features.10.weight"


# Which names the 1x8x8 digits images are too small for (the feature map would vanish).
TOO_SMALL_8 = {"ConvNetD4", "ConvNetD5", "ConvNetD6", "ConvNetD7", "ConvNetD8", "LeNet", "VGG11", "VGG11BN"}
TOO_SMALL_ANY = {"ConvNetD6", "ConvNetD7", "ConvNetD8"}  # deeper than log2(32) pooling blocks


SIZES = [(1, (28, 28)), (3, (32, 32)), (1, (8, 8))]
# Networks with millions of weights: one size in the default run (the shapes of all sizes are checked on the meta
# device above); every size with -m slow.
HEAVY = {"ConvNetW512", "ConvNetW1024", "ConvNetKIP", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN", "ResNet18_AP"}
HEAVY |= {"ResNet18BN_AP"}
BUILD_CASES = [
    pytest.param(name, c, hw, marks=[pytest.mark.slow] if name in HEAVY and (c, hw) != SIZES[0] else [])
    for name in NETWORK_NAMES
    for c, hw in SIZES
]


@pytest.mark.parametrize("name,c,hw", BUILD_CASES)
def test_every_name_builds_and_forwards(name, c, hw):
    if name in TOO_SMALL_ANY or (hw == (8, 8) and name in TOO_SMALL_8):
        with pytest.raises(ValueError, match="too small"):
            get_network(name, c, 10, hw, generator=gen())
        return
    net = get_network(name, c, 10, hw, generator=gen())
    x = torch.randn(2, c, *hw, generator=gen(1))
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert (convnet_spec(net) is not None) == name.startswith("ConvNet")


# ---------------------------------------------------------------------------------------------------------------
# Functional forward on a flat vector
# ---------------------------------------------------------------------------------------------------------------

FUNCTIONAL_CASES = [
    ("ConvNet", 3, (32, 32)),
    ("ConvNet", 1, (8, 8)),
    ("ConvNetBN", 1, (28, 28)),
    ("ConvNetLN", 3, (11, 9)),
    ("ConvNetMP", 1, (8, 8)),
    ("ConvNetAS", 3, (16, 16)),
    ("MLP", 1, (28, 28)),
    ("LeNet", 3, (32, 32)),
    ("AlexNet", 1, (8, 8)),
    pytest.param(*("VGG11BN", 1, (28, 28)), marks=pytest.mark.slow),
    pytest.param(*("ResNet18", 3, (8, 8)), marks=pytest.mark.slow),
    pytest.param(*("ResNet18BN_AP", 1, (8, 8)), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,c,hw", FUNCTIONAL_CASES)
def test_functional_forward_equals_module(name, c, hw):
    net = get_network(name, c, 5, hw, generator=gen(3))
    x = torch.randn(4, c, *hw, generator=gen(4))
    w = flatten_params(net)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    for training in (True, False):
        net.train(training)
        out = functional_forward(net, w, x)
        # BN nets: the functional forward uses batch statistics, i.e. the module in train mode.
        net.train()
        with torch.no_grad():
            expected = net(x)
        for k, v in buffers.items():  # restore what net(x) in train mode updated
            net.get_buffer(k).copy_(v)
        assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # The functional forward itself never touches the buffers.
    net.eval()
    functional_forward(net, w, x)
    net.train()
    functional_forward(net, w, x)
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k


@pytest.mark.parametrize("name,c,hw", FUNCTIONAL_CASES)
def test_functional_grad_equals_module_grad(name, c, hw):
    net = get_network(name, c, 5, hw, generator=gen(5))
    x = torch.randn(3, c, *hw, generator=gen(6))
    y = torch.tensor([0, 3, 1])
    w = flatten_params(net).requires_grad_(True)
    xw = x.clone().requires_grad_(True)
    gw, gx = torch.autograd.grad(F.cross_entropy(functional_forward(net, w, xw), y), [w, xw])
    xm = x.clone().requires_grad_(True)
    net.train()
    F.cross_entropy(net(xm), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert gw.abs().sum() > 0
    assert_close(gw, expected, rtol=1e-4, atol=1e-6)
    assert_close(gx, xm.grad, rtol=1e-4, atol=1e-6)


GRADCHECK_CASES = [
    pytest.param(norm, act, pool, marks=[] if (act == "relu" or norm == "instancenorm") else [pytest.mark.slow])
    for norm in ("instancenorm", "groupnorm", "layernorm", "batchnorm", "none")
    for act, pool in (("relu", "avgpooling"), ("leakyrelu", "maxpooling"), ("sigmoid", "none"))
]


@pytest.mark.parametrize("norm,act,pool", GRADCHECK_CASES)
def test_convnet_gradcheck_and_double_backward(norm, act, pool):
    # Odd sizes; one input channel (first-layer padding 3): 5x3 -> 9x7 -> 4x3 -> 6x5 -> 3x2 (with pooling).
    spec = ConvNetSpec(channel=1, num_classes=3, width=4, depth=2, norm=norm, act=act, pool=pool, im_size=(5, 3))
    net = build_convnet(spec, gen(7), dtype=torch.float64)
    w = flatten_params(net) + 0.05 * torch.randn(num_params(net), dtype=torch.float64, generator=gen(8))
    w.requires_grad_(True)
    x = torch.randn(2, 1, 5, 3, dtype=torch.float64, generator=gen(9), requires_grad=True)

    def f(w, x):
        return functional_forward(net, w, x)

    assert torch.autograd.gradcheck(f, (w, x))
    # fast_mode: random projections of the second derivative (the full Jacobian-of-vjp takes minutes here).
    assert torch.autograd.gradgradcheck(f, (w, x), fast_mode=True, check_batched_grad=False)


def test_double_backward_trajectory_step_pattern():
    # The naive engine's pattern: g = dl/dw with create_graph, then a loss of (w - lr g) differentiated again.
    net = get_network("ConvNet", 1, 10, (8, 8), generator=gen(10))
    w = flatten_params(net).requires_grad_(True)
    x = torch.randn(6, 1, 8, 8, generator=gen(11), requires_grad=True)
    y = torch.arange(6) % 10
    (g,) = torch.autograd.grad(F.cross_entropy(functional_forward(net, w, x), y), w, create_graph=True)
    w1 = w - 0.01 * g
    loss = F.cross_entropy(functional_forward(net, w1, x), y)
    gx, gw = torch.autograd.grad(loss, [x, w])
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0 and torch.isfinite(gw).all()


def test_per_sample_grads_with_vmap():
    # torch.func composes with functional_forward (per-sample gradients: vmap over [1, C, H, W] slices).
    net = get_network("ConvNetW32", 1, 10, (8, 8), generator=gen(14))
    w = flatten_params(net)
    x = torch.randn(3, 1, 8, 8, generator=gen(15))
    y = torch.tensor([1, 2, 3])

    def loss(w, xi, yi):
        return F.cross_entropy(functional_forward(net, w, xi.unsqueeze(0)), yi.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, y)
    for i in range(3):
        assert_close(per_sample[i], torch.func.grad(loss)(w, x[i], y[i]))
    assert_close(per_sample.mean(0), torch.func.grad(lambda w: F.cross_entropy(functional_forward(net, w, x), y))(w))


def test_flatten_unflatten_roundtrip():
    net = get_network("ConvNetBN", 3, 10, generator=gen(12))
    w = flatten_params(net)
    assert torch.equal(w, torch.cat([p.reshape(-1) for p in net.parameters()]))
    assert not w.requires_grad
    w2 = torch.randn(w.shape, generator=gen(13))
    unflatten_into(net, w2)
    assert torch.equal(flatten_params(net), w2)
    assert torch.equal(net.classifier.bias, w2[-10:])
    w2.zero_()  # no aliasing
    assert flatten_params(net).abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Initialization from a generator
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetBN", "LeNet", "ResNet18_AP"])
def test_generator_determinism(name):
    a = flatten_params(get_network(name, 3, 10, generator=gen(42)))
    b = flatten_params(get_network(name, 3, 10, generator=gen(42)))
    c = flatten_params(get_network(name, 3, 10, generator=gen(43)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generator_leaves_global_rng_alone():
    state = torch.get_rng_state()
    get_network("ConvNet", 3, 10, generator=gen(0))
    get_network("ResNet18BN_AP", 1, 10, (28, 28), generator=gen(0))
    assert torch.equal(state, torch.get_rng_state())
    # Without a generator, the global RNG is the source (PyTorch's default).
    torch.manual_seed(5)
    a = flatten_params(get_network("ConvNetW32", 3, 10))
    torch.manual_seed(5)
    assert torch.equal(a, flatten_params(get_network("ConvNetW32", 3, 10)))


def test_init_distribution_is_pytorch_default():
    net = get_network("ConvNet", 3, 10, generator=gen(0))
    conv = net.features[4]
    bound = 1.0 / (128 * 9) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert abs(conv.weight.std().item() - bound / 3**0.5) < 0.02 * bound  # uniform(-b, b): std b/sqrt(3)
    assert torch.equal(net.features[1].weight, torch.ones(128)) and torch.equal(net.features[1].bias, torch.zeros(128))
    bn = get_network("ConvNetBN", 3, 10, generator=gen(0)).features[1]
    assert torch.equal(bn.running_mean, torch.zeros(128)) and torch.equal(bn.running_var, torch.ones(128))
    assert int(bn.num_batches_tracked) == 0


def test_dtype_and_build_convnet_agree_with_get_network():
    a = get_network("ConvNet", 3, 10, generator=gen(1))
    b = get_network("ConvNet", 3, 10, generator=gen(1), dtype=torch.float64)
    assert b.classifier.weight.dtype == torch.float64
    assert torch.equal(flatten_params(a).double(), flatten_params(b))
    spec = convnet_spec(a)
    assert spec == ConvNetSpec(channel=3, num_classes=10)
    assert torch.equal(flatten_params(build_convnet(spec, gen(1))), flatten_params(a))
    assert isinstance(build_convnet(spec), ConvNet)


@pytest.mark.parametrize("device", devices())
def test_device_placement(device):
    net = get_network("ConvNet", 1, 10, (8, 8), generator=gen(2), device=device)
    assert all(p.device.type == device for p in net.parameters())
    x = torch.randn(2, 1, 8, 8, generator=gen(3)).to(device)
    assert_close(functional_forward(net, flatten_params(net), x), net(x))


@requires_cuda
def test_cpu_generator_gives_same_weights_on_cuda():
    a = flatten_params(get_network("ConvNet", 3, 10, generator=gen(4)))
    b = flatten_params(get_network("ConvNet", 3, 10, generator=gen(4), device="cuda"))
    assert torch.equal(a, b.cpu())


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown network 'ConvNetX'.*ConvNetBN.*ResNet18BN_AP"):
        get_network("ConvNetX", 3, 10)


@pytest.mark.parametrize("im_size", [(0, 32), (-1, -1), (32,), (32, 32, 3), "abc", (2.5, 3)])
def test_bad_im_size(im_size):
    with pytest.raises(ValueError, match="im_size"):
        get_network("ConvNet", 3, 10, im_size)


def test_square_int_im_size():
    assert convnet_spec(get_network("ConvNet", 3, 10, 16, generator=gen())).im_size == (16, 16)


@pytest.mark.parametrize(
    "name,c,hw", [("ConvNet", 3, (4, 4)), ("ConvNetD5", 1, (16, 16)), ("LeNet", 3, (12, 12)), ("VGG11", 3, (16, 16))]
)
def test_too_small_for_architecture(name, c, hw):
    with pytest.raises(ValueError, match=rf"im_size {hw[0]}x{hw[1]} is too small"):
        get_network(name, c, 10, hw)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "foo"}, "norm 'foo'.*instancenorm"),
        ({"act": "tanh"}, "activation 'tanh'.*leakyrelu"),
        ({"pool": "sum"}, "pooling 'sum'.*maxpooling"),
        ({"width": 6, "norm": "groupnorm"}, "multiple of 4"),
        ({"depth": 0}, "depth"),
        ({"channel": 0}, "channel"),
    ],
)
def test_bad_spec(kwargs, match):
    args = {"channel": 3, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        ConvNetSpec(**args)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        get_network("ConvNet", 3, 0)
    with pytest.raises(TypeError, match="dtype"):
        get_network("ConvNet", 3, 10, dtype=torch.int64)
    with pytest.raises(TypeError, match="generator"):
        get_network("ConvNet", 3, 10, generator=0)
    with pytest.raises(TypeError, match="ConvNetSpec"):
        build_convnet({"channel": 3})
    net = get_network("ConvNet", 1, 10, (8, 8), generator=gen())
    w = flatten_params(net)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=rf"\[{w.numel()}\]"):
        functional_forward(net, w[:-1], x)
    with pytest.raises(ValueError, match="flat parameter vector"):
        functional_forward(net, w.view(1, -1), x)
    with pytest.raises(TypeError, match="floating"):
        functional_forward(net, w.long(), x)
    with pytest.raises(ValueError, match="flat parameter vector"):
        unflatten_into(net, w[:5])
    with pytest.raises(ValueError, match=r"built for inputs \[B, 1, 8, 8\]"):
        net(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"built for inputs \[B, 1, 8, 8\]"):
        functional_forward(net, w, torch.randn(2, 1, 28, 28))

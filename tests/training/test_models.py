import math

import pytest
import torch
from torch import nn

from training.config import ConfigError
from training.models import ShortcutA, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, classes, expected", [
    ("resnet14", 10, 172_506),
    ("resnet14", 100, 178_356),
    ("resnet20", 10, 269_722),
    ("resnet32", 10, 464_154),
    ("resnet32", 100, 470_004),
])
def test_parameter_counts_match_he_et_al(arch, classes, expected):
    assert n_params(build_model(arch, classes)) == expected


@pytest.mark.parametrize("arch, expected", [("resnet14", 172_218), ("resnet20", 269_434), ("resnet32", 463_866)])
def test_a_one_channel_stem_has_288_weights_fewer(arch, expected):
    """Fashion-MNIST's grayscale stem: 16 x 1 x 3 x 3 weights instead of 16 x 3 x 3 x 3; nothing else changes."""
    model = build_model(arch, 10, in_channels=1)
    assert n_params(model) == expected == n_params(build_model(arch, 10)) - 288
    assert model.conv.weight.shape == (16, 1, 3, 3)


def test_a_one_channel_model_takes_28x28_to_stages_of_28_14_7():
    model = build_model("resnet8", 10, in_channels=1).eval()
    sizes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, out: sizes.append(tuple(out.shape[1:])))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sizes == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]


@pytest.mark.parametrize("arch, depth", [("resnet8", 8), ("resnet44", 44)])
def test_any_6n_plus_2_builds_with_depth_weighted_layers(arch, depth):
    model = build_model(arch, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth
    assert all(c.kernel_size == (3, 3) for c in convs)  # option A: no 1x1 projection shortcuts
    assert linears[0].in_features == 64 and linears[0].bias is not None


@pytest.mark.parametrize("arch", ["resnet15", "resnet", "vgg", "resnet2"])
def test_bad_arch_raises_config_error_naming_arch(arch):
    with pytest.raises(ConfigError, match="^arch: ") as info:
        build_model(arch, 10)
    assert info.value.field == "arch"


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_shape_in_both_memory_formats(channels_last):
    torch.manual_seed(0)
    model = build_model("resnet14", 100).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (2, 100)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_factory_leaves_model_on_cpu_in_train_mode():
    model = build_model("resnet8", 10)
    assert model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_init_kaiming_fan_out_and_identity_batchnorm():
    torch.manual_seed(0)
    model = build_model("resnet32", 10)
    # First conv of stage 2: 16 -> 32 channels, so fan_out (32*9) and fan_in (16*9) differ.
    conv = model.stages[1][0].conv1
    assert conv.weight.shape == (32, 16, 3, 3)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_stride_two_at_start_of_stages_two_and_three():
    model = build_model("resnet20", 10)
    strides = [[block.conv1.stride[0] for block in stage] for stage in model.stages]
    assert strides == [[1, 1, 1], [2, 1, 1], [2, 1, 1]]
    feats = model.stages(torch.zeros(1, 16, 32, 32))
    assert feats.shape == (1, 64, 8, 8)


def test_shortcut_a_subsamples_and_zero_pads_channels():
    x = torch.arange(2 * 16 * 8 * 8, dtype=torch.float32).view(2, 16, 8, 8)
    out = ShortcutA(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert not out[:, 16:].any()
    assert list(ShortcutA(16, 32, 2).parameters()) == []


def test_compiles_as_one_graph():
    model = build_model("resnet8", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: fails on graph breaks
    torch.testing.assert_close(compiled(x), model(x))

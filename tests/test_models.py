"""The CIFAR ResNet: parameter counts of the original, key names, shapes, bad depths."""
import pytest
import torch

from models import ResNet, resnet

pytestmark = pytest.mark.usefixtures("single_thread")

# Counts the original PyHessian reports for ResNet20 (see shared/DESIGN.md).
COUNTS_DEPTH20 = {
    (True, True): 272_474,
    (False, True): 270_906,
    (True, False): 269_722,
    (False, False): 268_346,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("batch_norm,residual", sorted(COUNTS_DEPTH20))
def test_parameter_counts_depth20(batch_norm, residual):
    model = resnet(20, batch_norm=batch_norm, residual=residual)
    assert n_params(model) == COUNTS_DEPTH20[(batch_norm, residual)]
    assert (model.depth, model.batch_norm, model.residual, model.num_classes) == (20, batch_norm, residual, 10)


def test_state_dict_keys_match_original_layout():
    keys = list(resnet(20).state_dict())
    assert len(keys) == 128
    assert keys[0] == "conv1.weight"
    assert keys[1:6] == [f"bn1.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    assert "layer1.0.conv1.weight" in keys and "layer1.0.bn2.running_var" in keys
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.weight" in keys
    assert "layer3.0.downsample.1.num_batches_tracked" in keys and "layer3.2.bn2.bias" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    # Shortcut projections only where the shape changes.
    assert not any(k.startswith(("layer1.0.downsample", "layer2.1.downsample")) for k in keys)


def test_no_bn_has_no_bn_modules_and_conv_only_shortcut():
    model = resnet(20, batch_norm=False)
    names = [n for n, _ in model.named_modules()]
    assert not any("bn" in n for n in names)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(model.layer2[0].downsample) == 1
    assert isinstance(model.layer2[0].downsample[0], torch.nn.Conv2d)


def test_no_residual_has_no_shortcut_and_no_addition():
    model = resnet(20, residual=False).eval()
    assert not any("downsample" in n for n, _ in model.named_modules())
    # Without the skip connection, zeroing a block's last BN scale makes the block output
    # relu(bn2.bias) = 0 exactly, independent of its input; with residuals it would not.
    block = model.layer1[0]
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.zeros_(block.bn2.bias)
    out = block(torch.randn(2, 16, 32, 32))
    assert torch.count_nonzero(out) == 0
    res_block = resnet(20).eval().layer1[0]
    torch.nn.init.zeros_(res_block.bn2.weight)
    torch.nn.init.zeros_(res_block.bn2.bias)
    x = torch.randn(2, 16, 32, 32)
    assert torch.allclose(res_block(x), torch.relu(x))


def test_convs_have_no_bias():
    for bn in (True, False):
        for m in resnet(20, batch_norm=bn).modules():
            if isinstance(m, torch.nn.Conv2d):
                assert m.bias is None


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_output_shapes(depth):
    model = resnet(depth).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert len(model.layer1) == (depth - 2) // 6


@pytest.mark.parametrize("batch_norm,residual", sorted(COUNTS_DEPTH20))
def test_variants_forward_and_num_classes_100(batch_norm, residual):
    model = resnet(20, num_classes=100, batch_norm=batch_norm, residual=residual).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def test_kaiming_init_like_original():
    torch.manual_seed(0)
    conv = resnet(56).layer3[5].conv2  # 64 out channels, 3x3: std sqrt(2 / (9 * 64))
    std = conv.weight.std().item()
    assert abs(std - (2.0 / (9 * 64)) ** 0.5) < 0.005


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 100, -4, 20.0, "20", True])
def test_bad_depth_raises(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet(depth)


def test_class_is_public():
    assert isinstance(resnet(8), ResNet)
    assert ResNet(depth=8, num_classes=5)(torch.randn(1, 3, 32, 32)).shape == (1, 5)

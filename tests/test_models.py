"""The CIFAR ResNet (parameter counts of the original, key names, shapes, bad depths, the
original's keywords) and your own model through --model module.path:callable."""
import pytest
import torch
from torch import nn

import utils
from models import ResNet, resnet
from support.models import ModelSpecError, accepts_num_classes, model_from_spec

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
    assert (model.depth, model.batch_norm, model.residual, model.num_classes) == (
        20, batch_norm, residual, 10)


def test_state_dict_keys_match_original_layout():
    keys = list(resnet(20).state_dict())
    assert len(keys) == 128
    assert keys[0] == "conv1.weight"
    assert keys[1:6] == [f"bn1.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                              "num_batches_tracked")]
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



# ------------------------------------------------------------------ PyHessian's keywords
# In the original models/resnet.py, `batch_norm_not=True` ADDS BatchNorm and `residual_not=True`
# ADDS the skip connections (despite the names); its training.py passes --batch-norm and
# --residual straight into them. The parameter counts come from shared/DESIGN.md.
@pytest.mark.parametrize("batch_norm,residual", sorted(COUNTS_DEPTH20))
def test_original_keywords(batch_norm, residual):
    model = resnet(num_classes=10, depth=20, residual_not=residual, batch_norm_not=batch_norm)
    assert n_params(model) == COUNTS_DEPTH20[(batch_norm, residual)]
    assert (model.batch_norm, model.residual) == (batch_norm, residual)
    ours = resnet(20, batch_norm=batch_norm, residual=residual)
    assert list(model.state_dict()) == list(ours.state_dict())


def test_pyhessians_own_call():
    model = resnet(num_classes=10, depth=20, residual_not=True, batch_norm_not=True)
    assert n_params(model) == 272_474 and model.batch_norm and model.residual
    assert isinstance(ResNet(20, residual_not=False), ResNet)  # the class takes them too
    assert not ResNet(20, residual_not=False).residual


def test_both_spellings_must_agree():
    assert resnet(8, batch_norm=False, batch_norm_not=False).batch_norm is False
    assert resnet(8, residual=True, residual_not=True).residual is True
    with pytest.raises(TypeError, match="batch_norm=True and batch_norm_not=False contradict"):
        resnet(8, batch_norm=True, batch_norm_not=False)
    with pytest.raises(TypeError, match="residual=False and residual_not=True contradict"):
        resnet(8, residual=False, residual_not=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'batchnorm'"):
        resnet(8, batchnorm=False)
    assert n_params(resnet(20, base_channel=16)) == 272_474
    with pytest.raises(ValueError, match="base_channel=32 is not supported"):
        resnet(20, base_channel=32)


# ------------------------------------------------------------------ --model module:callable
def tiny_cnn(num_classes=10):
    """A small model for the tests (any input size)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, num_classes))


def tiny_no_args():
    return nn.Linear(3, 2)


def tiny_kwargs(**kwargs):
    return nn.Linear(3, kwargs.get("num_classes", 1))


class TinyClass(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)


def not_a_model(num_classes=10):
    return {"num_classes": num_classes}


def broken(num_classes=10):
    raise RuntimeError("the user's model code failed")


NOT_CALLABLE = 42


@pytest.mark.parametrize("spec,classes", [
    ("test_models:tiny_cnn", 7), ("test_models:tiny_no_args", 2),
    ("test_models:tiny_kwargs", 7), ("test_models:TinyClass", 7),
    ("torch.nn:Identity", None)])
def test_model_from_spec_passes_num_classes_when_accepted(spec, classes):
    model = model_from_spec(spec, 7)
    assert isinstance(model, nn.Module)
    if classes is not None:
        assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == classes


def test_accepts_num_classes():
    assert accepts_num_classes(tiny_cnn) and accepts_num_classes(tiny_kwargs)
    assert accepts_num_classes(TinyClass) and not accepts_num_classes(tiny_no_args)


@pytest.mark.parametrize("spec,message", [
    ("tiny_cnn", "--model 'tiny_cnn' must be module.path:callable"),
    ("test_models:", "must be module.path:callable"),
    ("bad-name:x", "must be module.path:callable"),
    ("no_such_module_abc:net", "no module named 'no_such_module_abc'"),
    ("test_models:nope", "test_models has no attribute 'nope'"),
    ("test_models:TinyClass.nope", "test_models:TinyClass has no attribute 'nope'"),
    ("test_models:NOT_CALLABLE", "is a int, not a callable"),
    ("test_models:not_a_model", "test_models:not_a_model(num_classes=3) returned a dict, "
                                "not a torch.nn.Module"),
    ("test_models:broken", "calling test_models:broken(num_classes=3) failed: RuntimeError: "
                           "the user's model code failed"),
])
def test_bad_model_specs_are_one_line_user_errors(spec, message):
    with pytest.raises(ModelSpecError) as info:
        model_from_spec(spec, 3)
    assert isinstance(info.value, utils.UserError)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_custom_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn(3)
    path = tmp_path / "custom.pkl"
    arch = utils.custom_arch("test_models:tiny_cnn", 3)
    utils.save_checkpoint(path, model, utils.image_record(arch, "synthetic", None, 40), epoch=1,
                          test_accuracy=1.0, args={})
    loaded, meta = utils.load_checkpoint(path)
    assert meta["arch"] == {"name": "custom", "spec": "test_models:tiny_cnn", "num_classes": 3}
    assert meta["image_size"] == 40
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    again, _ = utils.load_checkpoint(path, model_spec="test_models:tiny_cnn")  # the same spec
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
    with pytest.raises(utils.CheckpointError, match="trained with --model test_models:tiny_cnn "
                       "but --model test_models:TinyClass was given"):
        utils.load_checkpoint(path, model_spec="test_models:TinyClass")
    with pytest.raises(utils.CheckpointError, match="describe the built-in ResNet only"):
        utils.load_checkpoint(path, batch_norm=False)


def test_model_spec_for_other_checkpoints(tmp_path):
    ours = tmp_path / "ours.pkl"
    utils.save_checkpoint(ours, resnet(8), utils.image_record(resnet(8), "synthetic"), epoch=1,
                          test_accuracy=1.0, args={})
    with pytest.raises(utils.CheckpointError, match="holds the built-in ResNet8, not --model"):
        utils.load_checkpoint(ours, model_spec="test_models:tiny_cnn")
    # a plain state_dict (as the original saves, `module.` prefix) of your own model
    model = tiny_cnn(5)
    plain = tmp_path / "plain.pkl"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, plain)
    loaded, meta = utils.load_checkpoint(plain, model_spec="test_models:tiny_cnn")
    assert meta["arch"] == {"name": "custom", "spec": "test_models:tiny_cnn", "num_classes": 5}
    assert torch.equal(loaded[-1].weight, model[-1].weight)
    with pytest.raises(utils.CheckpointError,
                       match="does not match test_models:TinyClass .5 classes.: 2 missing keys"):
        utils.load_checkpoint(plain, model_spec="test_models:TinyClass")

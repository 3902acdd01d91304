"""Small-image ResNets in timm's registry: stem geometry, feature maps, export and reload through timm."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from models.timm_models import SmallImageResNet


@pytest.mark.parametrize("stride, maps", [(1, [28, 28, 14, 7, 4]), (2, [14, 14, 7, 4, 2])])
def test_stem_keeps_the_resolution_a_28px_image_needs(stride, maps):
    model = timm.create_model(f"resnet18_s{stride}_w16", num_classes=0, in_chans=1)
    assert isinstance(model.maxpool, torch.nn.Identity) and model.conv1.kernel_size == (3, 3) and model.conv1.stride == (stride, stride)
    x = torch.randn(2, 1, 28, 28)
    maps_seen = model.forward_intermediates(x, intermediates_only=True)  # the stem's, then each stage's
    assert [m.shape[-1] for m in maps_seen] == maps
    # feature_info's reductions match the maps (dense tasks size their decoders from them).
    assert [math.ceil(28 / info["reduction"]) for info in model.feature_info] == maps
    assert model(x).shape == (2, 128) and model.num_features == 128


def test_timm_imagenet_stem_reaches_the_last_stage_at_one_pixel():
    """What the small-image variants fix: timm's resnet18 turns a 28 px image into 1x1 at stage 4."""
    model = timm.create_model("resnet18", num_classes=0, in_chans=1, channels=[16, 32, 64, 128])
    assert model.eval().forward_intermediates(torch.randn(1, 1, 28, 28), intermediates_only=True)[-1].shape[-1] == 1


@pytest.mark.parametrize("name, blocks, width", [("resnet10_s2_w32", [1, 1, 1, 1], 32), ("resnet34_s1_w16", [3, 4, 6, 3], 16),
                                                 ("resnet18_s2_w64", [2, 2, 2, 2], 64)])
def test_depth_and_width_follow_the_name(name, blocks, width):
    model = timm.create_model(name, num_classes=0, in_chans=3)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks
    assert [info["num_chs"] for info in model.feature_info][1:] == [width, 2 * width, 4 * width, 8 * width]


def test_timm_keywords_pass_through_and_zero_init_last_is_honoured():
    model = timm.create_model("resnet18_s2_w16", num_classes=0, in_chans=1, zero_init_last=False, drop_path_rate=0.1)
    assert model.layer1[0].bn2.weight.abs().sum() > 0
    assert timm.create_model("resnet18_s2_w16", num_classes=0, in_chans=1).layer1[0].bn2.weight.abs().sum() == 0


def test_exported_small_resnet_loads_back_through_timm(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18_s2_w16", num_classes=0, in_chans=1, zero_init_last=False)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = timm.create_model("resnet18_s2_w16", pretrained=True, num_classes=0, in_chans=1, zero_init_last=False,
                               pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors")})
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("resnet18_s2_w16", pretrained=True)


def test_bad_depth_or_stride_is_refused():
    with pytest.raises(ValueError, match="depth=12"):
        SmallImageResNet(depth=12)

"""darknet.py: DarkNet-53 (published parameter count), the pyramid, DropBlock, darknet weight files."""

import numpy as np
import pytest
import torch

from darknet import DarkNet53, DropBlock, FiveConv, Pyramid, read_darknet_weights, write_darknet_weights
from head import Detector


def test_darknet53_has_the_published_parameter_count():
    assert sum(p.numel() for p in DarkNet53().parameters()) == 40_584_928


@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (96, 32)])
def test_backbone_and_pyramid_shapes(hw):
    backbone, pyramid = DarkNet53(width=0.25, depth=0.34).eval(), Pyramid(width=0.25).eval()
    H, W = hw
    with torch.no_grad():
        c = backbone(torch.randn(1, 3, H, W))
        p = pyramid(c)
    assert {s: tuple(t.shape) for s, t in c.items()} == {
        8: (1, 64, H // 8, W // 8), 16: (1, 128, H // 16, W // 16), 32: (1, 256, H // 32, W // 32)}
    assert {s: tuple(t.shape) for s, t in p.items()} == {   # 512 / 256 / 256 at full width
        32: (1, 128, H // 32, W // 32), 16: (1, 64, H // 16, W // 16), 8: (1, 64, H // 8, W // 8)}


def test_spp_switch_is_darknets_five_conv_block():
    assert Pyramid(spp=False).s32.spp is None
    n_spp = sum(p.numel() for p in Pyramid(spp=True).parameters())
    n_plain = sum(p.numel() for p in Pyramid(spp=False).parameters())
    assert n_spp - n_plain == 2048 * 512 + 2 * 512           # the SPP's 1x1 2048 -> 512 conv + BN


def test_dropblock_is_identity_unless_training_with_keep_below_one():
    block, x = DropBlock(), torch.randn(2, 4, 16, 16)
    assert torch.equal(block.train()(x), x)                          # keep_prob 1
    block.block_size, block.keep_prob = 3, 0.9
    assert torch.equal(block.eval()(x), x)                           # eval mode
    torch.manual_seed(0)
    ones = torch.ones(8, 16, 32, 32)
    out = block.train()(ones)
    dropped = (out == 0).float().mean().item()
    assert 0.05 < dropped < 0.15                                     # about 1 - keep_prob
    torch.testing.assert_close(out.mean(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)  # rescaled
    # dropped pixels come in blocks: a dropped interior pixel has dropped neighbours
    zero = (out == 0)
    isolated = zero[..., 1:-1, 1:-1] & ~zero[..., :-2, 1:-1] & ~zero[..., 2:, 1:-1] \
        & ~zero[..., 1:-1, :-2] & ~zero[..., 1:-1, 2:]
    assert isolated.sum() == 0


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(0.5 + 0.5 * torch.rand(t.shape, generator=g) if "running_var" in name
                        else 0.1 * torch.randn(t.shape, generator=g))
    return model


def test_darknet_weight_file_round_trip(tmp_path):
    kwargs = dict(num_classes=3, fusion=None, guided=False, spp=False, width=0.25, depth=0.34)
    source, target = randomize(Detector(**kwargs), 1).eval(), randomize(Detector(**kwargs), 2).eval()
    path = tmp_path / "yolov3-tiny-width.weights"
    write_darknet_weights(path, source.darknet_layers())
    n_floats = sum(t.numel() for k, t in source.state_dict().items() if "num_batches" not in k)
    assert path.stat().st_size == 12 + 8 + 4 * n_floats              # header, seen, float32 data
    assert read_darknet_weights(path, target.darknet_layers()) == n_floats
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_darknet_layer_order_is_the_cfg_order():
    layers = Detector(fusion=None, guided=False, spp=False).darknet_layers()
    assert len(layers) == 75                                 # yolov3.cfg has 75 conv layers
    assert [b is None for _, b in layers].count(True) == 3   # the three 255-channel output convs
    assert [layers[i][0].out_channels for i in (58, 66, 74)] == [255, 255, 255]
    assert layers[52][0].in_channels == 1024 and layers[59][0].out_channels == 256  # route, lateral


def test_backbone_file_and_truncated_file(tmp_path):
    source, target = randomize(DarkNet53(0.25, 0.34), 3).eval(), DarkNet53(0.25, 0.34).eval()
    path = tmp_path / "darknet53.conv.74"
    write_darknet_weights(path, source.darknet_layers())
    read_darknet_weights(path, target.darknet_layers())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x)[32], target(x)[32])
    data = path.read_bytes()
    (tmp_path / "short.weights").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="short.weights"):
        read_darknet_weights(tmp_path / "short.weights", target.darknet_layers())
    (tmp_path / "long.weights").write_bytes(data + b"\0" * 64)
    with pytest.raises(ValueError, match="long.weights.*another layout"):
        read_darknet_weights(tmp_path / "long.weights", target.darknet_layers())
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [0, 2, 0]


def test_pyramid_runs_its_blocks_in_the_released_order():
    """FiveConv.forward: SPP after conv3 at stride 32, and each DropBlock where the release put
    it (baseline module_list 16, 24, 33): after conv4 at stride 32, after conv2 at 16 and 8."""
    pyramid, order = Pyramid(width=0.125), []
    for name, child in pyramid.named_children():          # a FiveConv's parts, or a lateral conv
        parts = child.named_children() if isinstance(child, FiveConv) else [("", child)]
        for part, module in parts:
            label = f"{name}.{part}" if part else name
            module.register_forward_hook(lambda m, i, o, label=label: order.append(label))
    pyramid(DarkNet53(width=0.125, depth=0.34)(torch.randn(1, 3, 64, 64)))
    assert order == ["s32.conv1", "s32.conv2", "s32.conv3", "s32.spp", "s32.spp_reduce",
                     "s32.conv4", "s32.drop", "s32.conv5", "s16_lateral",
                     "s16.conv1", "s16.conv2", "s16.drop", "s16.conv3", "s16.conv4", "s16.conv5",
                     "s8_lateral",
                     "s8.conv1", "s8.conv2", "s8.drop", "s8.conv3", "s8.conv4", "s8.conv5", "s8_out"]

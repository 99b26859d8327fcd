"""head.py: the composed detector against published figures, the golden outputs of the released
model, a float64 deformable-conv loop, and the released-checkpoint key map."""

import pytest
import torch
import torch.nn.functional as F

from golden import (
    LISTINGS,
    REFERENCE,
    VARIANTS,
    golden_model,
    golden_reference,
    needs_golden,
    needs_listings,
    read_listing,
    released_weights,
    weight_hashes,
)
from head import Detector, count_flops, deform_conv2d, load_released, released_key_map

CONFIGS = {"yolov3": dict(fusion=None, guided=False, spp=False), "baseline": dict(fusion=None),
           "sum": dict(fusion="sum"), "concat": dict(fusion="concat"), "asff": dict(fusion="asff"),
           "asff*": dict(fusion="asff", rfb=True, dropblock=True)}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --- published figures --------------------------------------------------------------------------
def test_original_yolov3_parameters_and_flops():
    model = Detector(80, fusion=None, guided=False, spp=False)
    assert n_params(model) == 61_949_149
    assert round(count_flops(model, 416) / 1e9, 2) == 65.86     # darknet counts 2 FLOPs per MAC
    assert round(count_flops(model, 608) / 1e9, 2) == 140.69


@pytest.mark.parametrize("variant,count", [("baseline", 75_554_428), ("asff", 79_409_493),
                                           ("asff-rfb", 86_011_821)])
def test_released_parameter_counts(variant, count):
    assert n_params(Detector(80, **VARIANTS[variant], dropblock=variant == "asff-rfb")) == count


@needs_listings
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_state_dict_keys_and_shapes(variant):
    model = Detector(80, **VARIANTS[variant], dropblock=variant == "asff-rfb")
    listing = read_listing(REFERENCE / LISTINGS[variant])
    ours = model.state_dict()
    key_map = released_key_map(model)
    assert sorted(key_map) == sorted(k for k, _ in listing)           # every released key mapped
    assert sorted(key_map.values()) == sorted(ours)                   # every parameter of ours filled
    for key, shape in listing:
        assert tuple(ours[key_map[key]].shape) == shape, key


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("hw", [(320, 320), (352, 608), (608, 416)])
def test_output_shapes(config, hw):
    model = Detector(5, **CONFIGS[config], width=0.125, depth=0.34)
    H, W = hw
    S = model.n_slots
    x = torch.randn(1, 3, H, W)
    raw = model.train()(x)
    for s in (32, 16, 8):
        assert raw[s]["pred"].shape == (1, S, 10, H // s, W // s)
        assert (raw[s]["anchor_log"] is None) == (config == "yolov3")
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (1, S * sum((H // s) * (W // s) for s in (32, 16, 8)), 10)


# --- golden equivalence with the released model -------------------------------------------------
def capture_features(model, x):
    """Run the model in eval mode and record the activations the golden files hold."""
    feats, hooks = {}, []

    def keep(name, fn=lambda out: out):
        return lambda module, args, out: feats.__setitem__(name, fn(out))

    hooks.append(model.backbone.register_forward_hook(
        lambda m, a, out: feats.update({f"backbone_s{s}": t for s, t in out.items()})))
    hooks.append(model.pyramid.register_forward_hook(
        lambda m, a, out: feats.update({f"neck_s{s}": t for s, t in out.items()})))
    for s in (32, 16, 8):
        into = model.fusion if model.fusion is not None else model.head_in
        hooks.append(into[f"s{s}"].register_forward_hook(keep(f"head_in_s{s}")))
        hooks.append(model.heads[f"s{s}"].dconv.register_forward_hook(keep(f"adapted_s{s}")))
        hooks.append(model.heads[f"s{s}"].guide.register_forward_hook(keep(f"guide_s{s}")))
        hooks.append(model.heads[f"s{s}"].pred.register_forward_hook(keep(f"pred_s{s}")))
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, feats


@needs_golden
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_eval_outputs(variant):
    ref = golden_reference(variant)
    assert weight_hashes(released_weights(variant)) == ref["weight_sha256"]
    model = golden_model(variant)
    out, feats = capture_features(model, ref["input"])
    for name, stored in ref["features"].items():
        torch.testing.assert_close(feats[name].mean(dim=1), stored["mean_c"], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{name} mean_c: {m}")
        torch.testing.assert_close(feats[name][:, :8], stored["ch0_7"], rtol=1e-4, atol=1e-4)
    for s in (32, 16, 8):
        F_ = ref["image_size"] // s
        torch.testing.assert_close(feats[f"guide_s{s}"], ref["raw"][f"s{s}"]["guide_wh"],
                                   rtol=1e-4, atol=1e-4)
        box_obj = feats[f"pred_s{s}"].view(2, 4, 85, F_, F_)[:, :, :5]
        torch.testing.assert_close(box_obj, ref["raw"][f"s{s}"]["conv_box_obj"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref["eval_output"], rtol=1e-4, atol=1e-4)
    if model.fusion is not None:
        maps = model.fusion_maps(ref["input"])
        for s in (32, 16, 8):
            torch.testing.assert_close(maps[s]["weights"], ref["fusion_weights"][f"s{s}"],
                                       rtol=1e-4, atol=1e-4)


@needs_golden
def test_folded_and_exported_models_match_eager():
    ref = golden_reference("asff")
    model = golden_model("asff")
    with torch.no_grad():
        eager = model(ref["input"])
        exported = torch.export.export(model, (ref["input"],)).module()
        torch.testing.assert_close(exported(ref["input"]), eager)
        model.fuse_conv_bn()
        torch.testing.assert_close(model(ref["input"]), eager, rtol=1e-3, atol=1e-3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


# --- deformable convolution ---------------------------------------------------------------------
def deform_conv_loop(x, offset, weight, bias, groups):
    """Float64 reference: DCNv1 by definition, one output position and tap at a time."""
    B, C, H, W = x.shape
    Co, k = weight.shape[0], weight.shape[-1]
    out = torch.zeros(B, Co, H, W, dtype=torch.float64)
    cg = C // groups

    def pixel(b, c, yy, xx):
        return x[b, c, yy, xx] if 0 <= yy < H and 0 <= xx < W else x.new_zeros(())

    for b in range(B):
        for h in range(H):
            for w in range(W):
                col = torch.zeros(C, k * k, dtype=torch.float64)
                for g in range(groups):
                    for t in range(k * k):
                        base = g * 2 * k * k + 2 * t
                        dy, dx = offset[b, base, h, w], offset[b, base + 1, h, w]
                        py = h + t // k - (k - 1) // 2 + dy
                        px = w + t % k - (k - 1) // 2 + dx
                        y0, x0 = int(torch.floor(py)), int(torch.floor(px))
                        ly, lx = py - y0, px - x0
                        for c in range(g * cg, (g + 1) * cg):
                            col[c, t] = ((1 - ly) * (1 - lx) * pixel(b, c, y0, x0)
                                         + (1 - ly) * lx * pixel(b, c, y0, x0 + 1)
                                         + ly * (1 - lx) * pixel(b, c, y0 + 1, x0)
                                         + ly * lx * pixel(b, c, y0 + 1, x0 + 1))
                out[b, :, h, w] = weight.reshape(Co, C * k * k) @ col.reshape(-1) + bias
    return out


def test_deform_conv_with_zero_offsets_is_a_plain_conv():
    x, w, b = torch.randn(2, 8, 7, 9), torch.randn(6, 8, 3, 3), torch.randn(6)
    zero = torch.zeros(2, 4 * 18, 7, 9)
    torch.testing.assert_close(deform_conv2d(x, zero, w, b, groups=4),
                               F.conv2d(x, w, b, padding=1), rtol=1e-5, atol=1e-5)


def test_deform_conv_matches_float64_loop_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 6, generator=g, dtype=torch.float64)
    offset = 2.5 * torch.randn(1, 2 * 18, 5, 6, generator=g, dtype=torch.float64)  # many outside
    w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(deform_conv2d(x, offset, w, b, groups=2),
                               deform_conv_loop(x, offset, w, b, groups=2), rtol=1e-9, atol=1e-9)
    args = [t.clone().requires_grad_(True) for t in (x, offset, w, b)]
    assert torch.autograd.gradcheck(lambda *a: deform_conv2d(*a, groups=2), args)


def test_deform_conv_values_and_gradients_match_float64_loop_on_integers_and_off_the_map():
    """Autograd through the float64 loop as the reference for the gradients too: batch 2, 3 groups,
    odd sizes, offsets landing on exact integers (the derivative is floor's side, as DCN's kernels
    take it) and far off the map; NCHW and NHWC (channels_last, as the model runs) inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    offset = 2.5 * torch.randn(2, 3 * 18, 5, 7, generator=g, dtype=torch.float64)
    offset[:, 0::4] = offset[:, 0::4].round()                  # dy of every other tap: integers
    offset[:, 1::8] = 9 * offset[:, 1::8].sign()               # some dx: off the map
    w = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, offset, w, b)]
    expected = deform_conv_loop(*leaves, groups=3)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for layout in (torch.contiguous_format, torch.channels_last):
        args = [t.contiguous(memory_format=layout) if t.dim() == 4 else t.clone() for t in (x, offset, w, b)]
        args = [t.requires_grad_(True) for t in args]
        out = deform_conv2d(*args, groups=3)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
        for name, got, want in zip(("x", "offset", "weight", "bias"),
                                   torch.autograd.grad(out, args, grad_out), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{layout} d/d{name}")


def test_deform_conv_reads_zeros_far_off_the_map_and_keeps_nan_offsets_to_their_position():
    """Offsets of 1e30 sample zeros (the bias is left); a NaN offset (a diverged training step)
    gives NaN at its own output position, not an index error or NaN elsewhere."""
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(1, 4, 5, 7, generator=g), torch.randn(3, 4, 3, 3, generator=g), torch.randn(3)
    for groups in (1, 2):
        far = torch.full((1, groups * 18, 5, 7), 1e30)
        far[:, 1::2] *= -1                                     # dy = +1e30, dx = -1e30
        torch.testing.assert_close(deform_conv2d(x, far, w, b, groups), b.view(1, 3, 1, 1).expand(1, 3, 5, 7))
        offset = torch.randn(1, groups * 18, 5, 7, generator=g)
        offset[0, 7, 2, 3] = float("nan")
        out = deform_conv2d(x, offset, w, b, groups)
        assert out[0, :, 2, 3].isnan().all() and out.isnan().sum() == 3


# --- released checkpoints -----------------------------------------------------------------------
def small_released_state(model):
    """A released-format state dict for `model` built through the inverse key map."""
    ours = model.state_dict()
    return {rel: ours[key].clone() for rel, key in released_key_map(model).items()}


def test_load_released_names_missing_extra_and_misshaped_keys(tmp_path):
    model = Detector(80, fusion="asff", width=0.125, depth=0.34)
    state = small_released_state(model)
    path = tmp_path / "yolov3_asff.pth"
    missing = dict(state)
    del missing["level_1_fusion.weight_levels.bias"]
    torch.save(missing, path)
    with pytest.raises(KeyError, match=r"yolov3_asff\.pth.*level_1_fusion\.weight_levels\.bias"):
        load_released(model, str(path))
    with pytest.raises(KeyError, match="unexpected keys.*'extra.weight'"):
        load_released(model, {**state, "extra.weight": torch.zeros(1)})
    bad = dict(state)
    bad["level_2_header.conv.weight"] = torch.zeros(7, 32, 1, 1)
    with pytest.raises(ValueError, match=r"level_2_header\.conv\.weight.*\(7, 32, 1, 1\).*\(340, 32, 1, 1\)"):
        load_released(model, bad)


def test_load_released_casts_fp16_and_loads_a_backbone_only_file():
    source = Detector(80, fusion=None, width=0.125, depth=0.34)
    state = {k: (v.half() if v.is_floating_point() else v)
             for k, v in small_released_state(source).items()}
    target = Detector(80, fusion=None, width=0.125, depth=0.34)
    load_released(target, state)
    for key, value in target.state_dict().items():
        assert value.dtype == source.state_dict()[key].dtype
        torch.testing.assert_close(value, source.state_dict()[key].half().to(value.dtype))
    backbone = {k: v for k, v in small_released_state(source).items()
                if int(k.split(".")[1]) <= 10}                  # darknet53_feature_mx.pth layout
    fresh = Detector(80, fusion="asff", width=0.125, depth=0.34)
    head_before = fresh.heads["s8"].pred.weight.clone()
    load_released(fresh, backbone)
    assert torch.equal(fresh.backbone.stem.conv.weight, source.backbone.stem.conv.weight)
    assert torch.equal(fresh.heads["s8"].pred.weight, head_before)
    plain = Detector(80, fusion=None, guided=False, spp=False, width=0.125, depth=0.34)
    load_released(plain, backbone)                  # Table 1's rows without guided anchoring
    for key, value in plain.backbone.state_dict().items():
        assert torch.equal(value, source.backbone.state_dict()[key]), key


def test_msra_init_and_dropblock_hook():
    model = Detector(80, fusion="asff", rfb=True, dropblock=True)
    w = model.backbone.stage5.down.conv.weight                     # fan_in = 512 * 9
    expected_std = (2 / ((1 + 0.1 ** 2) * 512 * 9)) ** 0.5
    assert abs(w.std().item() / expected_std - 1) < 0.02
    assert model.heads["s8"].pred.bias.abs().max() == 0
    model.set_dropblock({32: 7, 16: 5, 8: 3}, 0.9)
    blocks = model.pyramid.dropblocks()
    assert (blocks[32].block_size, blocks[8].block_size, blocks[16].keep_prob) == (7, 3, 0.9)
    plain = Detector(80, fusion="asff", width=0.125)
    plain.set_dropblock({32: 7, 16: 5, 8: 3}, 0.9)
    assert plain.pyramid.dropblocks()[32].keep_prob == 1.0        # no DropBlock unless asked


def test_demo_prints_the_published_parameters_and_flops_in_seconds(capsys):
    """`python head.py` counts on the meta device: the README's table, darknet's published
    YOLOv3 figures (61,949,149 parameters, 65.86 GFLOPs at 416) among them."""
    import head
    head._demo(sizes=(416,))
    rows = {line[:18].strip(): line[18:].split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["original YOLOv3"] == ["61,949,149", "65.86"]
    assert rows["ASFF"] == ["79,409,493", "80.98"] and rows["ASFF*"] == ["86,011,821", "86.05"]
    assert len(rows) == 6


def test_deform_conv_under_bf16_autocast_samples_in_float32(monkeypatch):
    """Issue 25: under a bf16 autocast the gather and its backward run in float32 (cast in, cast
    out); forward and gradients agree with float32 to bf16's precision, and the output is bf16."""
    import head
    seen, gather = [], head.GatherCorners.apply
    monkeypatch.setattr(head.GatherCorners, "apply", lambda rows, table, weights: seen.append(
        (table.dtype, weights.dtype, torch.is_autocast_enabled())) or gather(rows, table, weights))
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 8, 6, 7, generator=g), torch.randn(5, 8, 3, 3, generator=g), torch.randn(5)
    offset = 1.5 * torch.randn(2, 2 * 18, 6, 7, generator=g)
    grad_out = torch.randn(2, 5, 6, 7, generator=g)
    ref_args = [t.clone().requires_grad_(True) for t in (x, offset, w, b)]
    ref = deform_conv2d(*ref_args, groups=2)
    ref_grads = torch.autograd.grad(ref, ref_args, grad_out)
    args = [t.clone().requires_grad_(True) for t in (x, offset, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(args[0].bfloat16(), args[1], args[2], args[3], groups=2)  # a bf16 input
    assert out.dtype == torch.bfloat16
    assert set(seen) == {(torch.float32, torch.float32, False)}
    grads = torch.autograd.grad(out.float(), args, grad_out)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.03 * ref.abs().max().item())
    for name, got, want in zip(("x", "offset", "weight", "bias"), grads, ref_grads):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=0, atol=0.03 * want.abs().max().item(), msg=name)


# ---------------------------------------------------------------------------------------------
# Fine-tuning start: a whole detector of another class count (train.py --weights)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("classes_from, classes_to", [(80, 3), (5, 3), (3, 3), (3, 7)])
def test_transfer_keeps_box_rows_and_reinitialises_class_rows(guided, classes_from, classes_to):
    from evaluate import transfer_weights
    torch.manual_seed(0)
    trained = Detector(classes_from, fusion="asff", guided=guided, width=0.125, depth=0.34)
    with torch.no_grad():                                    # "trained": every value moved
        for t in trained.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
    torch.manual_seed(1)
    model = Detector(classes_to, fusion="asff", guided=guided, width=0.125, depth=0.34)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    renewed = transfer_weights(model, trained.state_dict(), "demo/last.pt")   # the keys given new rows
    after, source, S = model.state_dict(), trained.state_dict(), model.n_slots
    pred_keys = {f"heads.s{s}.pred.{p}" for s in (8, 16, 32) for p in ("weight", "bias")}
    for key, value in after.items():
        if key in pred_keys and classes_from != classes_to:
            rows, src = value.view(S, 5 + classes_to, -1), source[key].view(S, 5 + classes_from, -1)
            assert torch.equal(rows[:, :5], src[:, :5]), key                   # box + obj kept
            assert torch.equal(rows[:, 5:], fresh[key].view(S, 5 + classes_to, -1)[:, 5:]), key
        else:
            assert torch.equal(value, source[key]), key                        # loaded as is
    assert set(renewed) == (pred_keys if classes_from != classes_to else set())


def test_transfer_from_a_released_file_of_another_class_count(tmp_path):
    """A released-format ASFF checkpoint (80 classes) -> load_released -> 3 classes."""
    from evaluate import transfer_weights
    released = Detector(80, fusion="asff", width=0.125, depth=0.34)
    path = tmp_path / "yolov3_asff.pth"
    torch.save(small_released_state(released), path)
    source = load_released(Detector(80, fusion="asff", width=0.125, depth=0.34), str(path))
    model = Detector(3, fusion="asff", width=0.125, depth=0.34)
    assert len(transfer_weights(model, source.state_dict(), str(path))) == 6
    key = "pyramid.s32.conv1.conv.weight"
    assert torch.equal(model.state_dict()[key], released.state_dict()[key])


def test_transfer_refuses_another_architecture_naming_key_file_and_shapes():
    from evaluate import transfer_weights
    model = Detector(3, fusion="asff", width=0.125, depth=0.34)
    with pytest.raises(ValueError, match=r"f\.pt: .*fusion\.s\d+\."):                # names a missing key
        transfer_weights(model, Detector(3, fusion=None, width=0.125, depth=0.34).state_dict(), "f.pt")
    wider = Detector(3, fusion="asff", width=0.25, depth=0.34).state_dict()
    with pytest.raises(ValueError, match=r"f\.pt: .*size mismatch for \S+"):         # names key and shapes
        transfer_weights(model, wider, "f.pt")

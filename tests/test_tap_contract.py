"""One tap contract for every family (timm's style): named, ordered as the forward runs, pooled by the rule,
deterministic. Random weights, small inputs."""
import pytest
import timm
import torch

from pipeline.pooling import pooled_dim
from pipeline.taps import HEAD_TAPS, TappedForward, default_taps, select_taps

FAMILIES = {  # model -> (input size, create kwargs)
    "resnet10t": (32, {}),                                              # ResNet
    "resnetv2_18": (32, {}),                                            # pre-activation ResNetV2 (the paper's)
    "tf_efficientnet_lite0": (32, {}),                                  # EfficientNet
    "mobilenetv3_small_050": (32, {}),                                  # MobileNetV3
    "convnext_atto": (32, {}),                                          # ConvNeXt
    "regnetx_002": (32, {}),                                            # RegNet
    "vit_tiny_patch16_224": (32, {"img_size": 32}),                     # ViT
    "deit_tiny_distilled_patch16_224": (32, {"img_size": 32}),          # DeiT (CLS + distillation token)
    "swin_tiny_patch4_window7_224": (64, {"img_size": 64, "window_size": 2}),  # hierarchical transformer
    "coatnet_nano_rw_224": (64, {"img_size": 64}),                      # hybrid CNN-transformer
}
ROLES = {"stem", "conv1", "conv2", "block", "expansion", "depthwise", "head_conv", "patch_embedding",
         "position_embedded", "pre_attention_norm", "attention", "mlp_hidden", "mlp_output", "final_sequence",
         "conv1_input", "conv2_input", "conv3_input", "final_map", "feature", "pre_logits", "logits"}


def build(name):
    size, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval(), size


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tap_contract(name):
    model, size = build(name)
    taps = default_taps(model)
    names = [t.name for t in taps]
    assert len(names) == len(set(names)) and len(names) >= 5
    assert names[-2:] == list(HEAD_TAPS)
    assert {t.role for t in taps} <= ROLES

    order = []
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda *_a, n=n: order.append(n)) for n in names if n not in HEAD_TAPS]
    runner = TappedForward(model, taps, 256)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        first, second = runner(x), runner(x)
    for h in hooks:
        h.remove()
    assert [n for n in dict.fromkeys(order)] == names[:-2], "taps must be listed in forward order"

    table = runner.layer_table(size)
    for row, a, b in zip(table, first, second):
        assert torch.equal(a, b), row["name"]
        assert a.shape == (2, row["dim"])
        if row["name"] not in HEAD_TAPS:
            assert row["dim"] == pooled_dim(tuple(row["raw_shape"]), 256), row
    with torch.inference_mode():
        torch.testing.assert_close(first[-1], model(x), rtol=1e-5, atol=1e-6)


def test_vit_cls_token_modes():
    model, size = build("deit_tiny_distilled_patch16_224")
    taps = select_taps(model, ["blocks.0.mlp", "patch_embed"])
    x = torch.randn(1, 3, size, size)
    widths = {}
    for mode in ("pooled", "only", "separate"):
        runner = TappedForward(model, taps, 256, cls_mode=mode)
        with torch.inference_mode():
            out = runner(x)
        runner.close()
        widths[mode] = [o.shape[1] for o in out]
        if mode == "only":
            tokens = {}
            h = dict(model.named_modules())["blocks.0.mlp"].register_forward_hook(
                lambda _m, _i, o: tokens.setdefault("t", o))
            with torch.inference_mode():
                model(x)
            h.remove()
            torch.testing.assert_close(out[1][0], tokens["t"][0, 0])  # the raw CLS vector
    C, N = 192, 4 + 2  # 2x2 patches + CLS + distillation token
    assert widths["pooled"] == [pooled_dim((4, C), 256), pooled_dim((N, C), 256)]
    assert widths["only"] == [pooled_dim((4, C), 256), C]  # patch embedding has no prefix tokens
    assert widths["separate"] == [pooled_dim((4, C), 256), C + pooled_dim((N - 2, C), 256)]


def test_user_taps_by_module_pattern_and_unknown_names():
    model, _ = build("convnext_atto")
    chosen = select_taps(model, ["stages.0.blocks.*.norm"])
    assert [t.name for t in chosen] == ["stages.0.blocks.0.norm", "stages.0.blocks.1.norm"]
    assert all(t.role == "user" for t in chosen)
    with pytest.raises(Exception, match="stages.0.blocks.0.norm"):
        select_taps(model, ["stages.0.blocks.0.nrom"])

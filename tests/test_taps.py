import pytest
import timm
import torch

from pipeline.errors import H2TError
from pipeline.pooling import pooled_dim
from pipeline.taps import TappedForward, default_taps, select_taps


def skeleton(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, **kw).eval()


def test_efficientnet_taps_cover_every_mbconv_stage():
    names = [t.name for t in default_taps(skeleton("tf_efficientnet_lite0"))]
    assert names[0] == "bn1" and names[-3:] == ["bn2", "pre_logits", "logits"]
    assert names[1:3] == ["blocks.0.0.bn1", "blocks.0.0"]  # depthwise-separable block: depthwise + output
    assert names[3:6] == ["blocks.1.0.bn1", "blocks.1.0.bn2", "blocks.1.0"]  # expansion, depthwise, output
    assert len(names) == 1 + 2 + 15 * 3 + 1 + 2


@pytest.mark.parametrize("name,units,per_unit", [("resnet50", 16, 3), ("resnet18", 8, 2)])
def test_resnet_taps_every_residual_unit(name, units, per_unit):
    taps = default_taps(skeleton(name))
    assert len(taps) == 1 + units * per_unit + 2
    assert taps[0].name == "act1" and taps[-1].name == "logits"
    assert sum(t.role == "block" for t in taps) == units


def test_vit_taps_follow_the_reference_list():
    names = [t.name for t in default_taps(skeleton("vit_tiny_patch16_224"))]
    assert names[:6] == ["patch_embed", "pos_drop", "blocks.0.norm1", "blocks.0.attn", "blocks.0.mlp.act", "blocks.0.mlp"]
    assert len(names) == 2 + 12 * 4 + 1 + 2


def test_selection_by_pattern_keeps_network_order():
    model = skeleton("resnet18")
    names = [t.name for t in select_taps(model, ["logits", "layer1.**", "act1"])]
    assert names == ["act1", "layer1.0.act1", "layer1.0", "layer1.1.act1", "layer1.1", "logits"]
    assert [t.name for t in select_taps(model, ["**"], ["layer**"])] == ["act1", "pre_logits", "logits"]
    extra = select_taps(model, ["layer2.0.bn2"])
    assert extra[0].name == "layer2.0.bn2" and extra[0].role == "user"


def test_unknown_tap_names_closest_matches():
    with pytest.raises(H2TError, match="layer1.0.act1"):
        select_taps(skeleton("resnet18"), ["layer1.0.actl"])
    with pytest.raises(H2TError, match="no tap selected"):
        select_taps(skeleton("resnet18"), ["act1"], ["act1"])


@pytest.mark.parametrize("name", ["resnet10t", "tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_pooled_widths_match_the_layer_table_and_runs_are_identical(name):
    kw = {"img_size": 32} if "vit" in name else {}
    meta_table = TappedForward(skeleton(name, **kw), default_taps(skeleton(name, **kw)), 256).layer_table(32)
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    runner = TappedForward(model, default_taps(model), 256)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        first, second = runner(x), runner(x)
    for row, a, b in zip(meta_table, first, second):
        assert a.shape == (2, row["dim"]), row["name"]
        assert torch.equal(a, b)
        if row["name"] not in ("pre_logits", "logits"):
            assert row["dim"] == pooled_dim(tuple(row["raw_shape"]), 256)
    assert torch.equal(first[-1], model(x))  # the logits tap is the model's output

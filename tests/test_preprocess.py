import numpy as np
import pytest
import torch
from omegaconf.errors import ValidationError

from pipeline.errors import H2TError
from pipeline.preprocess import build_preprocess
from tests.conftest import model_cfg

CPU = torch.device("cpu")


def test_squash_resizes_without_cropping_and_normalises():
    pre = build_preprocess(model_cfg(input_size=40, mean=[0.5] * 3, std=[0.5] * 3, interpolation="bilinear",
                                     resize="squash"))
    batch = np.full((2, 20, 30, 3), 255, np.uint8)
    x = pre(batch, CPU)
    assert x.shape == (2, 3, 40, 40)
    torch.testing.assert_close(x, torch.ones_like(x))
    mixed = pre([batch[0], np.zeros((7, 9, 3), np.uint8)], CPU)
    assert mixed.shape == (2, 3, 40, 40) and float(mixed[1].max()) == -1.0
    stripes = np.zeros((1, 10, 40, 3), np.uint8)
    stripes[:, :, :2] = 255  # a bright left edge survives squashing
    assert float(pre(stripes, CPU)[0, 0, :, 0].mean()) > 0.5


def test_center_crop_follows_timm_eval_transform():
    pre = build_preprocess(model_cfg(input_size=32, mean=[0, 0, 0], std=[1, 1, 1], resize="center_crop",
                                     crop_pct=0.5, interpolation="nearest"))
    img = np.zeros((1, 64, 128, 3), np.uint8)
    img[:, 16:48, 48:80] = 255  # the centre half of the shorter side, centred
    x = pre(img, CPU)
    assert x.shape == (1, 3, 32, 32)
    assert float(x.min()) == 1.0  # shorter side -> 64 (= 32 / 0.5), crop 32 x 32 in the centre: all bright


def test_defaults_come_from_the_pretrained_config():
    pre = build_preprocess(model_cfg(name="resnet18", input_size=None))
    assert (pre.input_size, pre.interpolation, pre.resize, pre.crop_pct) == (224, "bicubic", "center_crop", 0.95)
    assert pre.mean == (0.485, 0.456, 0.406)


def test_timm_resolves_the_data_config_border_crop_and_test_size_included():
    """timm.data.resolve_data_config decides the defaults: a model whose crop_mode is `border` keeps it (it
    used to become a centre crop), and model.use_test_size takes the model's test_input_size."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    border = build_preprocess(model_cfg(name="deepseek_vit_412m", input_size=None))
    assert border.resize == "border"
    expected = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg("convnext_atto").to_dict(), use_test_size=True)
    tested = build_preprocess(model_cfg(name="convnext_atto", input_size=None, use_test_size=True))
    assert tested.input_size == expected["input_size"][-1] == 288
    assert build_preprocess(model_cfg(name="convnext_atto", input_size=None)).input_size == 224


def test_border_keeps_the_whole_image_and_pads_with_the_mean_colour():
    pre = build_preprocess(model_cfg(input_size=32, mean=[0.5, 0.5, 0.5], std=[1, 1, 1], resize="border",
                                     crop_pct=1.0, interpolation="nearest"))
    img = np.full((1, 16, 64, 3), 255, np.uint8)  # wide: longer side -> 32, height 8, padded to 32
    x = pre(img, CPU)
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(x[0, :, 12:20, :], torch.full((3, 8, 32), 0.5))  # the image: 1.0 - mean
    pad = round(255 * 0.5) / 255 - 0.5
    assert torch.allclose(x[0, :, :12, :], torch.full((3, 12, 32), pad)) and torch.allclose(x[0, :, 20:, :], torch.full((3, 12, 32), pad))


@pytest.mark.parametrize("key,value", [("input_size", 3), ("std", [1, 0, 1]), ("crop_pct", 1.5)])
def test_bad_preprocessing_values_are_named(key, value):
    with pytest.raises(H2TError, match=f"model.{key}"):
        build_preprocess(model_cfg(**{key: value}))


@pytest.mark.parametrize("key,value", [("interpolation", "lanczos"), ("resize", "pad")])
def test_unknown_preprocessing_choices_are_refused_by_the_schema(key, value):
    with pytest.raises(ValidationError, match=key):
        model_cfg(**{key: value})

import numpy as np
import pytest
import torch

from pipeline.errors import H2TError
from pipeline.preprocess import build_preprocess
from tests.test_backbone import model_cfg

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


@pytest.mark.parametrize("key,value", [("input_size", 3), ("interpolation", "lanczos"), ("std", [1, 0, 1]),
                                       ("resize", "pad"), ("crop_pct", 1.5)])
def test_bad_preprocessing_values_are_named(key, value):
    with pytest.raises(H2TError, match=f"model.{key}"):
        build_preprocess(model_cfg(**{key: value}))

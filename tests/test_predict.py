"""h2t predict (pipeline/predict.py): a saved head applied to image files gives the store's numbers, so a test
folder's accuracy is the reported test accuracy; the backbone stops at the last selected tap."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import H2TError
from pipeline.head import load_head, read_columns
from pipeline.predict import Predictor
from pipeline.storage.store import open_store

CLASSES = ["blob", "bar", "stripes"]


def write_folder(root: Path, rng) -> None:
    """Three noisy classes: hard enough that accuracy is neither 0 nor 1."""
    for split, n in (("train", 20), ("test", 16)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 200, (36, 36, 3)).astype(np.int32)
                if c == 0:
                    img[8:26, 8:26, 0] += 40
                elif c == 1:
                    img[4:32, 4:12, 1] += 40
                else:
                    img[::5, :, 2] += 40
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:02d}.png")


def h2t(cwd, *args):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    return proc


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    write_folder(tmp / "imgs", np.random.default_rng(3))
    out = tmp / "out"
    proc = h2t(tmp, "run", "model=resnet_tiny", "data=folder", f"data.root={tmp / 'imgs'}", "pooling.target_size=128",
               "score.max_iter=50", "head.steps=40", "extract.progress=false", f"store.root={tmp / 'stores'}",
               f"hydra.run.dir={out}", "methods=[head2toe,linear,per_layer]")
    assert proc.returncode == 0, proc.stderr
    return tmp, out, json.loads((out / "results.json").read_text())["results"]


@pytest.mark.parametrize("method", ["head2toe", "linear", "per_layer"])
def test_a_test_folder_gets_the_reported_test_accuracy(probed, method):
    tmp, out, results = probed
    reported = next(r for r in results if r["method"] == method)["test_accuracy"]
    assert 0.0 < reported < 1.0
    head = [str(out / f"{method}.head.pt")] if method != "per_layer" else [str(out), "--method", method]  # a run's folder
    proc = h2t(tmp, "predict", *head, str(tmp / "imgs" / "test"), "--out",
               str(tmp / f"{method}.csv"), "--batch-size", "7", "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"accuracy against the folder names: {100 * reported:.1f} %" in proc.stdout
    rows = (tmp / f"{method}.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 16 * 3 and rows[0] == "path,class,class_index,probability"
    correct = sum(Path(r.split(",")[0]).parent.name == r.split(",")[1] for r in rows[1:])
    assert correct / 48 == pytest.approx(reported)


def test_features_are_the_store_columns_and_the_forward_stops_at_the_last_tap(probed):
    tmp, out, results = probed
    h2 = next(r for r in results if r["method"] == "head2toe")
    artefact = load_head(out / "head2toe.head.pt")
    store = open_store(h2["store_path"])
    plan = {layer["name"]: layer["columns"].numpy() for layer in artefact["layers"]}
    assert sum(len(c) for c in plan.values()) == h2["n_features_selected"]
    ids = store.sample_ids("test")  # paths under the folder root, in the store's (shuffled) order
    images = np.stack([np.asarray(Image.open(tmp / "imgs" / p).convert("RGB")) for p in ids])
    predictor = Predictor(artefact, "cpu")
    try:
        np.testing.assert_allclose(predictor.features(images), read_columns(store, "test", plan), atol=2e-3)
        fc = dict(predictor.parts[0].runner.model.named_modules())["fc"]
        calls = []
        handle = fc.register_forward_hook(lambda *a: calls.append(1))
        predictor.features(images[:2])
        handle.remove()
        assert calls == [] and "logits" not in plan  # the classifier never runs when logits are not selected
    finally:
        predictor.close()
    first = artefact["layers"][0]
    early = {**artefact, "layers": [first], "weight": artefact["weight"][:, :len(first["columns"])]}
    predictor = Predictor(early, "cpu")
    try:
        later = dict(predictor.parts[0].runner.model.named_modules())["layer4"]
        calls = []
        handle = later.register_forward_hook(lambda *a: calls.append(1))
        predictor.features(images[:2])
        handle.remove()
        assert first["name"].startswith(("act1", "layer1")) and calls == []  # stopped after the last tap
    finally:
        predictor.close()


def test_per_layer_probes_every_tap_alone_and_reports_the_best(probed):
    tmp, out, results = probed
    per_layer = next(r for r in results if r["method"] == "per_layer")
    linear = next(r for r in results if r["method"] == "linear")
    taps = [entry["layer"] for entry in per_layer["per_layer"]]
    assert taps == list(next(r for r in results if r["method"] == "head2toe")["selected_per_layer"])  # every tap, in order
    best = max(per_layer["per_layer"], key=lambda e: e["val_accuracy"])
    assert per_layer["best_layer"] == best["layer"] and per_layer["test_accuracy"] == best["test_accuracy"]
    # the tap the linear probe reads, alone, with the same head settings, is the linear probe
    alone = next(e for e in per_layer["per_layer"] if e["layer"] == "pre_logits")
    assert alone["test_accuracy"] == pytest.approx(linear["test_accuracy"])
    assert per_layer["backbone_images"] == 0 and (out / "per_layer.png").is_file()


def test_predict_names_the_head_it_cannot_find_in_a_folder(probed):
    tmp, out, _ = probed
    proc = h2t(tmp, "predict", str(out), str(tmp / "imgs" / "test"), "--method", "ridge")
    assert proc.returncode == 2 and "holds no ridge.head.pt" in proc.stderr and "head2toe.head.pt" in proc.stderr


def test_bad_head_files_are_one_line(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a head")
    with pytest.raises(H2TError, match="cannot be read"):
        load_head(tmp_path / "x.pt")
    torch.save({"format": 99}, tmp_path / "y.pt")
    with pytest.raises(H2TError, match="is not an h2t head"):
        load_head(tmp_path / "y.pt")
    proc = h2t(tmp_path, "predict", str(tmp_path / "missing.pt"), str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("h2t: error") == 1 and "missing.pt" in proc.stderr

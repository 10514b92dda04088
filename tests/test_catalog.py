"""h2t store ls / info / verify / rm / gc on real stores."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.errors import H2TError
from pipeline.extract import extract
from pipeline.storage import catalog
from pipeline.storage.store import create_store, open_store
from tests.conftest import make_store, shard_object, tiny_job


def store_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "store", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def extracted(tmp_path):
    return extract(tiny_job(tmp_path)).store


def shard_file(store, split="train", layer=None, shard=1):
    layer = layer or store.layers[2]["name"]
    return str(shard_object(store, f"{split}/features/{layer}", shard))


def test_verify_passes_on_a_sound_store(extracted):
    assert catalog.verify(extracted) == []


def test_verify_names_a_flipped_byte(extracted, tmp_path):
    path = shard_file(extracted)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x40
    open(path, "wb").write(data)
    problems = catalog.verify(open_store(extracted.path))
    layer = extracted.layers[2]["name"]
    assert len(problems) == 1 and f"train/features/{layer} shard 1" in problems[0]
    proc = store_cli("verify", extracted.path, cwd=tmp_path)
    assert proc.returncode == 2 and f"{layer} shard 1" in proc.stderr


def test_verify_names_a_missing_shard(extracted):
    os.remove(shard_file(extracted, split="test", shard=0))
    problems = catalog.verify(open_store(extracted.path))
    assert any("test/features" in p and "shard 0" in p and "missing" in p for p in problems)


def test_ls_info_rm(extracted, tmp_path):
    root = str(tmp_path / "stores")
    rows = catalog.list_summaries(root)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["id"] == extracted.id and row["status"] == "complete" and row["features"] == extracted.n_features
    assert row["size_bytes"] > 0 and row["taps"] == len(extracted.layers) and row["created_by"]
    proc = store_cli("ls", root, "--json", cwd=tmp_path)
    assert json.loads(proc.stdout)[0]["id"] == extracted.id
    proc = store_cli("info", extracted.id[:6], "--root", root, cwd=tmp_path)
    assert proc.returncode == 0 and extracted.layers[0]["name"] in proc.stdout and "provenance" in proc.stdout
    proc = store_cli("rm", extracted.id, "--root", root, cwd=tmp_path)
    assert proc.returncode == 0 and not os.path.exists(extracted.path)
    proc = store_cli("info", "ffff", "--root", root, cwd=tmp_path)
    assert proc.returncode == 2 and "no store 'ffff'" in proc.stderr


def test_a_store_removed_after_it_was_listed_is_left_out(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        path = tmp_path / "stores" / f"{name}.zarr"
        make_store(path, {"train": rng.random((8, 4), np.float32)}, {"train": np.arange(8) % 2}, 2)
        paths.append(str(path))
    catalog.remove(paths[0])
    rows = catalog.summaries(paths)  # as if another process removed it between listing and opening
    assert [row["path"] for row in rows] == [paths[1]] and rows[0]["status"] == "complete"


def test_gc_removes_only_old_incomplete_stores(extracted, tmp_path):
    root = tmp_path / "stores"
    layers = [{"name": "l", "role": "t", "raw_shape": [4], "dim": 4, "offset": 0}]
    partial = create_store(str(root / "m" / "d" / "abandoned.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}},
                           layers, {"train": 32}, 2, ["a", "b"], 16, "float32", 4, "none")
    partial.write_rows("train", 0, [np.ones((16, 4), np.float32)])
    assert catalog.abandoned(str(root), 3600) == []  # fresh: someone may still be writing
    old = time.time() - 7200
    for dirpath, _, files in os.walk(partial.path):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old))
    proc = store_cli("gc", str(root), "--older-than-hours", "1", "--dry-run", cwd=tmp_path)
    assert "would remove" in proc.stdout and os.path.exists(partial.path)
    proc = store_cli("gc", str(root), "--older-than-hours", "1", cwd=tmp_path)
    assert "removed" in proc.stdout and not os.path.exists(partial.path)
    assert os.path.exists(extracted.path)


def test_resolve_errors():
    with pytest.raises(H2TError, match="not a directory"):
        catalog.find_stores("/nonexistent/root")


@pytest.mark.parametrize("action", ["info", "verify", "rm"])
def test_store_commands_given_the_wrong_thing_say_so_in_one_line(extracted, tmp_path, action):
    root = tmp_path / "stores"
    second = create_store(str(root / "m" / "d" / f"{extracted.id[:3]}fffffffffffff.zarr"), {"model": {"name": "m"}},
                          extracted.layers, {"train": 2}, 2, ["a", "b"], 16, "float16", 64, "lz4")
    assert second.id != extracted.id
    cases = [
        ([str(root)], "is not a store (no zarr.json there); for the stores under a root: h2t store ls"),
        ([str(root / "m")], "is not a store"),
        (["deadbeef", "--root", str(root)], "no store 'deadbeef' under"),
        ([extracted.id[:3], "--root", str(root)], "is ambiguous"),
        (["abc", "--root", str(tmp_path / "nowhere")], "the store root"),
        ([str(tmp_path / "gone.zarr")], "no such store"),
    ]
    for args, message in cases:
        proc = store_cli(action, *args, cwd=tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("h2t: error")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert open_store(extracted.path) is not None  # nothing was removed


def test_an_all_zero_shard_is_present_and_told_from_a_deleted_one(tmp_path):
    rng = np.random.default_rng(0)
    X = {"train": np.abs(rng.standard_normal((48, 24))).astype(np.float32), "test": np.ones((16, 24), np.float32)}
    X["train"][16:32, 8:16] = 0.0  # a dead tap for one whole shard (16 rows)
    X["test"][:] = 0.0  # and a split of black images
    y = {"train": np.arange(48) % 2, "test": np.arange(16) % 2}
    store = make_store(tmp_path / "z.zarr", X, y, 2, spec={"widths": [8, 8, 8]})
    assert catalog.verify(open_store(store.path)) == []
    zero_shard = shard_object(store, "train/features/layer1", 1)
    assert zero_shard.is_file() and shard_object(store, "test/features/layer0", 0).is_file()
    os.remove(zero_shard)
    problems = catalog.verify(open_store(store.path))
    assert len(problems) == 1 and "train/features/layer1 shard 1" in problems[0] and "missing" in problems[0]

"""Two `h2t extract` of one store at once: shards split between them, nothing lost, result = a single run."""
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

from pipeline.extract import extract, plan_store
from pipeline.storage.claims import Claims
from pipeline.storage.store import StaleShard, create_store, open_store
from tests.conftest import ARGS, OVERRIDES, tiny_job


def test_two_writers_share_the_work_and_match_a_single_run(tmp_path):
    reference = extract(tiny_job(tmp_path / "ref", **OVERRIDES)).store
    root = tmp_path / "stores"
    path = plan_store(tiny_job(tmp_path, **OVERRIDES)).path
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", *ARGS, f"store.root={root}", "extract.poll_s=0.05"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()
    images = [int(re.search(rb"(\d+) images through the backbone", out).group(1)) for out, _ in outs]
    assert sum(images) <= 480 + 16, images  # at most one shard computed twice
    assert sum(images) >= 480 and min(images) > 0, images  # both did part of the work
    store = open_store(path)
    assert store.complete
    assert not (Path(path) / "claims").exists()  # every claim released, their folders gone: no stray zarr node
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns about a folder that is no node of the hierarchy
        assert set(store.splits()) <= set(dict(zarr.open_group(path, mode="r").members()))
    for split in reference.splits():
        for layer in reference.layers:
            assert store.features(split, layer["name"])[:].tobytes() == \
                reference.features(split, layer["name"])[:].tobytes()


def test_claims_are_exclusive_and_lapse(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    a, b = Claims(store, ttl_s=0.3), Claims(store, ttl_s=0.3)
    assert a.try_claim("train/0") and not b.try_claim("train/0") and not a.try_claim("train/0")
    time.sleep(0.4)
    assert b.try_claim("train/0")  # a's lease lapsed
    a.release("train/0")  # a late release does not drop b's claim
    assert not Claims(store, ttl_s=0.3).try_claim("train/0")
    b.release("train/0")
    assert a.try_claim("train/0")
    dead = Claims(store, ttl_s=300)
    dead.owner = dead.owner.split(":")[0] + ":999999999:dead"  # a process of this host that does not exist
    assert dead.try_claim("train/1")
    assert a.try_claim("train/1")  # its owner is gone: no need to wait for the lease
    assert a._read("claims/train/1")["owner"] == a.owner and "train/1" in a.held
    a.release_all()
    b.release("train/0")
    assert not (tmp_path / "s" / "claims").exists()  # the folders emptied by the releases go with them
    assert a.try_claim("train/2") and (tmp_path / "s" / "claims" / "train" / "2").exists()  # and come back


def test_taking_over_an_expired_claim_never_deletes_a_newer_one(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    stalled = Claims(store, ttl_s=0.01)
    assert stalled.try_claim("train/0")
    time.sleep(0.05)
    seen, tag = stalled._read_tagged("claims/train/0")  # what a slow writer read: an expired claim
    first = Claims(store, ttl_s=60)
    assert first.try_claim("train/0")  # another writer took it over meanwhile
    slow = Claims(store, ttl_s=60)
    assert not slow._take_over("claims/train/0", seen, tag, b"{}")  # the slow writer acts on what it read
    assert slow._read("claims/train/0")["owner"] == first.owner and not slow.try_claim("train/0")
    mine = b'{"owner": "slow", "expires": 0}'
    assert slow._take_over("claims/train/0", first._read("claims/train/0"), None, mine)  # what it read is there
    assert (tmp_path / "s" / "claims" / "train" / "0").read_bytes() == mine
    assert slow.try_claim("train/0")
    assert sorted(p.name for p in (tmp_path / "s" / "claims" / "train").iterdir()) == ["0"]  # no temp file stays


def test_a_renewal_never_overwrites_the_claim_of_a_writer_that_took_it_over(tmp_path, monkeypatch):
    """A renewer that stalled past the lease reads its own claim, lapsed; a taker replaces it before the renewal
    writes. On a local store the renewal reads and writes under the store's lock, which the take-over needs too:
    the taker then finds the claim renewed, and exactly one of them holds it."""
    store = LocalStore(str(tmp_path / "s"))
    stalled, taker = Claims(store, ttl_s=0.01), Claims(store, ttl_s=60)
    assert stalled.try_claim("train/0")
    time.sleep(0.05)  # lapsed
    stalled.ttl_s = 60  # the renewal then pushes it well beyond the taker's read
    read, took = stalled._read_tagged, []

    def read_then_a_taker_moves(key):  # the taker acts between the renewal's read and its write
        found = read(key)
        if threading.current_thread() is renewer:
            rival = threading.Thread(target=lambda: took.append(taker.try_claim("train/0")))
            rival.start()
            rival.join(timeout=0.5)  # blocked on the lock: it cannot finish while the renewal holds it
        return found

    monkeypatch.setattr(stalled, "_read_tagged", read_then_a_taker_moves)
    renewed = []
    renewer = threading.Thread(target=lambda: renewed.append(stalled.renew("train/0")))
    renewer.start()
    renewer.join()
    deadline = time.time() + 10
    while not took and time.time() < deadline:
        time.sleep(0.01)
    owner = stalled._read("claims/train/0")["owner"]
    assert renewed == [True] and took == [False] and owner == stalled.owner


WIDEN_SCRIPT = """
import sys, torch
from pipeline.extract import extract, plan_store
from tests.conftest import tiny_cfg
from tests.test_claims import overflowing_forward
cfg = tiny_cfg(__import__('pathlib').Path(sys.argv[1]), **{"store.on_overflow": "widen", "extract.poll_s": 0.05,
               "extract.writers": 1, "extract.lease_s": 60})
plan = plan_store(cfg.extract_job())
result = extract(cfg.extract_job(), plan, forward=overflowing_forward([l["dim"] for l in plan.layers]))
print("images", result.backbone_images)
"""


def overflowing_forward(dims: list[int], tap: int = 2):
    """A stand-in backbone: per-image values that float16 holds exactly, except tap `tap`, which reaches 1e6
    on a third of the images (those whose mean pixel is high): the first such batch widens that tap."""
    def forward(x):
        base = torch.round(x.flatten(1) * 8) / 8
        out = [base[:, :d].repeat(1, -(-d // base.shape[1]))[:, :d].float() for d in dims]
        hot = x.flatten(1).mean(1) > x.flatten(1).mean(1).quantile(0.66)
        out[tap][hot, 0] = 1e6
        return out
    return forward


def test_two_writers_widen_a_tap_safely_and_match_a_single_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reference = subprocess.run([sys.executable, "-c", WIDEN_SCRIPT, str(tmp_path / "ref")], env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    procs = [subprocess.Popen([sys.executable, "-c", WIDEN_SCRIPT, str(tmp_path / "two")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    ref = open_store(str(next((tmp_path / "ref" / "stores").glob("*/*/*.zarr"))))
    two = open_store(str(next((tmp_path / "two" / "stores").glob("*/*/*.zarr"))))
    tap = ref.layers[2]["name"]
    assert ref.layer_dtypes()[tap] == two.layer_dtypes()[tap] == "float32" and two.meta.get("widening") is None
    assert two.meta["widened"] == [tap] and two.complete
    for split in ref.splits():
        for layer in ref.layers:
            a, b = ref.features(split, layer["name"])[:], two.features(split, layer["name"])[:]
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (split, layer["name"])


def test_a_writer_that_must_widen_while_another_widens_gives_its_shards_up(tmp_path):
    """The widening process waits until no other process holds a shard; a writer that needs the widening too
    must not wait for it holding its shards (each would wait on the other until the lease lapsed, and then
    both would widen at once: a CI failure of the two-writer test above). It gives them up and carries on."""
    over = {"store.on_overflow": "widen", "extract.poll_s": 0.05, "extract.writers": 1, "extract.lease_s": 600}
    reference = extract(tiny_job(tmp_path / "ref", **over),
                        forward=overflowing_forward([l["dim"] for l in plan_store(tiny_job(tmp_path / "ref", **over)).layers]))
    job = tiny_job(tmp_path / "two", **over)
    plan = plan_store(job)
    forward, gate, at_gate = overflowing_forward([l["dim"] for l in plan.layers]), threading.Event(), threading.Event()

    def gated(x):  # the first batch, which overflows, waits until the other process has begun its widening
        at_gate.set()
        assert gate.wait(60)
        return forward(x)

    outcome: dict = {}

    def run(name, call):
        try:
            outcome[name] = call()
        except BaseException as error:  # noqa: BLE001 - reported by the asserts below
            outcome[name] = error

    writer = threading.Thread(target=run, args=("writer", lambda: extract(job, plan, forward=gated)), daemon=True)
    writer.start()
    assert at_gate.wait(60)  # the writer holds its first shards and computes the first of them
    other = open_store(plan.path)
    tap = other.layers[2]["name"]
    widener = threading.Thread(target=run, daemon=True, args=(
        "widener", lambda: other.widen_layer(tap, Claims(other.group.store, ttl_s=600), poll_s=0.05)))
    widener.start()
    deadline = time.monotonic() + 30
    while open_store(plan.path).meta.get("widening") != tap:  # announced: it now waits for the writer's shards
        assert time.monotonic() < deadline and widener.is_alive(), outcome
        time.sleep(0.02)
    gate.set()
    widener.join(60)
    writer.join(60)
    assert not widener.is_alive() and not writer.is_alive(), "the writer and the widener wait on each other"
    assert outcome["widener"] is None and not isinstance(outcome["writer"], BaseException), outcome
    two = open_store(plan.path)
    assert two.complete and two.meta["widened"] == [tap] and two.layer_dtypes()[tap] == "float32"
    assert not (Path(plan.path) / "claims").exists()  # every shard claim given up was claimed again and released
    for split in reference.store.splits():
        for layer in reference.store.layers:
            a, b = reference.store.features(split, layer["name"])[:], two.features(split, layer["name"])[:]
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (split, layer["name"])


def test_claims_held_through_work_longer_than_the_lease_are_kept_and_released_ones_stay_released(tmp_path):
    """`kept()` (what extraction runs its shards in) renews every claim held: a shard slower than the lease is
    not taken over by another writer, and a claim released meanwhile is not made again by a renewal."""
    store = LocalStore(str(tmp_path / "s"))
    writer, rival = Claims(store, ttl_s=0.3), Claims(store, ttl_s=60)
    assert writer.try_claim("train/0") and writer.try_claim("train/1")
    with writer.kept():
        deadline = time.monotonic() + 1.5  # five leases
        while time.monotonic() < deadline:
            assert not rival.try_claim("train/0") and not rival.try_claim("train/1")
            time.sleep(0.05)
        writer.release("train/1")
        assert writer.try_claim("train/2")  # claimed inside the block: kept as well
        time.sleep(0.5)
        assert not (tmp_path / "s" / "claims" / "train" / "1").exists()
        assert not rival.try_claim("train/2")
    time.sleep(0.5)  # the block is over: the claims lapse
    assert rival.try_claim("train/0") and rival.try_claim("train/2")


def test_a_widening_that_outlasts_the_lease_keeps_its_claim(tmp_path):
    layers = [{"name": "t0", "role": "t", "raw_shape": [4], "dim": 4, "offset": 0},
              {"name": "t1", "role": "t", "raw_shape": [4], "dim": 4, "offset": 4}]
    store = create_store(str(tmp_path / "w.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}}, layers,
                         {"train": 32}, 2, ["a", "b"], 8, "float16", 4, "lz4")
    store.write_rows("train", 0, [np.ones((8, 4), np.float16), np.full((8, 4), 2, np.float16)])
    busy = Claims(store.group.store, ttl_s=60)  # a writer busy with shard 1 for five of the widening's leases
    assert busy.try_claim("train/1")
    widener = open_store(store.path)
    thread = threading.Thread(target=widener.widen_layer, args=("t1", Claims(widener.group.store, ttl_s=0.3)),
                              kwargs={"poll_s": 0.05})
    thread.start()
    deadline = time.monotonic() + 30
    while open_store(store.path).meta.get("widening") != "t1":  # claimed and announced: it waits for shard 1
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rival = Claims(store.group.store, ttl_s=60)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert not rival.try_claim("widen")  # renewed while it waits: never taken over as lapsed
        time.sleep(0.05)
    busy.release("train/1")
    thread.join(30)
    assert not thread.is_alive() and open_store(store.path).layer_dtypes()["t1"] == "float32"
    assert rival.try_claim("widen")  # released when done
    assert open_store(store.path).features("train", "t1")[:8].tolist() == [[2.0] * 4] * 8


def test_a_write_that_overlaps_a_widening_is_not_marked_done(tmp_path):
    layers = [{"name": "t0", "role": "t", "raw_shape": [4], "dim": 4, "offset": 0},
              {"name": "t1", "role": "t", "raw_shape": [4], "dim": 4, "offset": 4}]
    store = create_store(str(tmp_path / "w.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}}, layers,
                         {"train": 32}, 2, ["a", "b"], 8, "float16", 4, "lz4")
    blocks = [np.ones((8, 4), np.float16), np.full((8, 4), 2, np.float16)]
    store.write_rows("train", 0, blocks, {"t0": "float16", "t1": "float16"})
    other = Claims(store.group.store, ttl_s=60)  # another writer, busy with shard 1
    assert other.try_claim("train/1")
    widener = open_store(store.path)
    started = time.monotonic()
    thread = threading.Thread(target=widener.widen_layer, args=("t1",), kwargs={"poll_s": 0.05})
    thread.start()
    time.sleep(0.3)
    assert store.widening() and thread.is_alive()  # announced, and waiting for shard 1's writer
    with pytest.raises(StaleShard):  # that writer's shard, cast as float16 during the widening
        store.write_rows("train", 8, blocks, {"t0": "float16", "t1": "float16"})
    assert not store.ledger_entry("train", 1)
    other.release("train/1")
    thread.join(timeout=30)
    assert time.monotonic() - started >= 0.3 and not store.widening()
    assert store.layer_dtypes()["t1"] == "float32" and store.features("train", "t1")[0:8].tolist() == blocks[1].tolist()
    with pytest.raises(StaleShard):  # cast before the widening: computed again with the new dtypes
        store.write_rows("train", 8, blocks, {"t0": "float16", "t1": "float16"})
    store.write_rows("train", 8, [blocks[0], blocks[1].astype(np.float32)], {"t0": "float16", "t1": "float32"})
    assert store.ledger_entry("train", 1)


def test_a_claim_made_while_its_folder_is_being_removed_still_lands(tmp_path, monkeypatch):
    from pipeline.storage import claims as claims_module

    real_write, calls = Path.write_bytes, []

    def write_after_a_removal(self, data):  # a release elsewhere removes the folder right after it is made
        calls.append(self)
        if len(calls) == 2 and self.parent.exists():
            self.parent.rmdir()
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_after_a_removal)
    target = tmp_path / "claims" / "train" / "0"
    assert claims_module.create_local(target, b"{}") and target.read_bytes() == b"{}" and len(calls) == 3

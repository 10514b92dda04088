"""Two `h2t extract` of one store at once: shards split between them, nothing lost, result = a single run."""
import re
import subprocess
import sys

import numpy as np

from pipeline.extract import extract, plan_store
from pipeline.storage.store import open_store
from tests.test_resume import ARGS, OVERRIDES
from tests.conftest import tiny_cfg


def test_two_writers_share_the_work_and_match_a_single_run(tmp_path):
    reference = extract(tiny_cfg(tmp_path / "ref", **OVERRIDES)).store
    root = tmp_path / "stores"
    path = plan_store(tiny_cfg(tmp_path, **OVERRIDES)).path
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
    for split in reference.splits():
        for layer in reference.layers:
            assert store.features(split, layer["name"])[:].tobytes() == \
                reference.features(split, layer["name"])[:].tobytes()


def test_claims_are_exclusive_and_lapse(tmp_path):
    import time

    from zarr.storage import LocalStore

    from pipeline.storage.claims import Claims

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

"""kill -9 a real `h2t extract` at several moments; rerunning finishes a store bitwise equal to an uninterrupted run."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from pipeline.extract import decode_workers, extract, plan_store, writer_threads
from pipeline.storage.store import open_store
from tests.conftest import ARGS, OVERRIDES, tiny_cfg, tiny_job


def cli_extract(root, cwd):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", *ARGS, f"store.root={root}"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def shards_done(path):
    try:
        store = open_store(path)
        return sum(int(store.shards_done(s).sum()) for s in store.splits())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def test_kill_minus_nine_then_resume_is_bitwise_identical(tmp_path):
    reference_cfg = tiny_cfg(tmp_path / "ref", **OVERRIDES)
    result = extract(reference_cfg)
    reference = result.store
    root = tmp_path / "stores"
    path = plan_store(tiny_job(tmp_path, **OVERRIDES)).path
    assert path.startswith(str(root))
    total = sum(-(-n // 16) for n in (320, 32, 128))
    assert result.writes is not None and result.writes.shards == total  # every shard's write accounted
    assert 0 < result.writes.cpu_s and 0 < result.writes.wall_s
    rng = np.random.default_rng(0)
    kills = 0
    for target in sorted(rng.choice(np.arange(2, total - 2), size=3, replace=False)):
        proc = cli_extract(root, tmp_path)
        deadline = time.time() + 120
        while shards_done(path) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0, 0.05)))  # somewhere inside the next shard
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        store = open_store(path)
        assert store is not None and not store.complete
    assert kills >= 2
    proc = cli_extract(root, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    resumed = open_store(path)
    assert resumed.complete
    before = shards_done(path)
    assert before == total
    for split in reference.splits():
        np.testing.assert_array_equal(resumed.labels(split), reference.labels(split))
        for layer in reference.layers:
            a = resumed.features(split, layer["name"])[:]
            b = reference.features(split, layer["name"])[:]
            assert a.tobytes() == b.tobytes(), f"{split}/{layer['name']}"
    # the last run only did what was left of the 480 images
    images = int(re.search(rb"(\d+) images through the backbone", out).group(1))
    assert 0 < images < 480


def test_decoders_default_to_one_thread_beside_a_cpu_forward_and_four_beside_a_cuda_one():
    assert decode_workers(None, torch.device("cpu")) == 1  # processes would fight the forward's threads
    assert decode_workers(None, torch.device("cuda")) == 4
    assert decode_workers(3, torch.device("cpu")) == 3


def test_writers_default_to_one_thread_beside_a_cpu_forward_and_two_beside_a_cuda_one():
    assert writer_threads(None, torch.device("cpu")) == 1  # a second writer took the cores from the forward
    assert writer_threads(None, torch.device("cuda")) == 2
    assert writer_threads(4, torch.device("cpu")) == 4

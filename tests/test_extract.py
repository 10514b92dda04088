"""kill -9 a real `h2t extract` at several moments; rerunning finishes a store bitwise equal to an uninterrupted run."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from pipeline.extract import decode_workers, extract, plan_store, writer_threads
from pipeline.storage.store import open_store
from tests.conftest import ARGS, OVERRIDES, tiny_cfg, tiny_job


def cli_extract(root, cwd, *extra):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", *ARGS, f"store.root={root}", *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


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


def shared_memory_mapped(pid: int) -> set[str]:
    """The POSIX shared-memory segments a process maps (/dev/shm files in its memory map)."""
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/shm/psm_" in line}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_extraction_leaves_no_worker_processes_or_shared_memory_behind(tmp_path, sig):
    """SIGTERM (`kill`, a scheduler's time limit) stops an extraction as Ctrl-C does: exit 143, one line, claims
    released, writer processes stopped; after SIGKILL the writer processes end on their own. Either way their
    shared memory is removed and the store is left incomplete, to resume."""
    root = tmp_path / "stores"
    extra = ["data.sizes.train=2000", "extract.writers_in=processes", "extract.writers=2"]
    proc = cli_extract(root, tmp_path, *extra)
    deadline, path, segments, workers = time.time() + 120, None, set(), []
    while proc.poll() is None and time.time() < deadline:
        found = list(root.glob("*/*/*.zarr"))
        path = str(found[0]) if found else None
        segments = shared_memory_mapped(proc.pid)
        workers = psutil.Process(proc.pid).children(recursive=True)
        if path and shards_done(path) >= 3 and segments and len(workers) >= 3:  # two writers, one tracker
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the extraction ended before it could be stopped"
    assert len(workers) >= 3 and segments
    os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=20)
    finally:  # a failure leaves nothing running
        for process in psutil.wait_procs(workers, timeout=0)[1]:
            process.kill()
    assert not alive, f"still running after the extraction stopped: {[w.cmdline()[-1][:60] for w in alive]}"
    assert not any(os.path.exists(segment) for segment in segments)
    assert not open_store(path).complete
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and err.decode().strip().splitlines()[-1].startswith("h2t: terminated")
        assert not (Path(path) / "claims").exists()  # released: another writer need not wait for the lease
        proc = cli_extract(root, tmp_path, *extra)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        assert open_store(path).complete
    else:
        assert proc.returncode == -signal.SIGKILL


def test_decoders_default_to_one_thread_beside_a_cpu_forward_and_four_beside_a_cuda_one():
    assert decode_workers(None, torch.device("cpu")) == 1  # processes would fight the forward's threads
    assert decode_workers(None, torch.device("cuda")) == 4
    assert decode_workers(3, torch.device("cpu")) == 3


def test_writers_default_to_one_thread_beside_a_cpu_forward_and_two_beside_a_cuda_one():
    assert writer_threads(None, torch.device("cpu")) == 1  # a second writer took the cores from the forward
    assert writer_threads(None, torch.device("cuda")) == 2
    assert writer_threads(4, torch.device("cpu")) == 4

"""Each extraction process that writes rows records what its machine decided (pipeline/storage/runs.py):
zarr readers do not see the records, `h2t store info` lists them, and a resume made otherwise says so."""
import json
import multiprocessing
import os
import subprocess
import sys

import zarr

from pipeline.extract import extract
from pipeline.storage import runs
from pipeline.storage.schema import STATUS_WRITING
from pipeline.storage.store import open_store
from tests.conftest import tiny_job

GPU_RUN = {"started_at": "2026-01-01T00:00:00+00:00", "by": "someone@gpu-box", "host": "gpu-box", "pid": 7,
           "device": "cuda", "device_name": "NVIDIA H200", "decode": "nvjpeg", "tf32_convolutions": True, "tf32_matmuls": False,
           "writers_in": "threads", "torch": "2"}


def store_info(path) -> dict:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "store", "info", str(path), "--json"],
                         capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout)


def test_an_extraction_records_its_run_once_as_a_plain_zarr_group(tmp_path):
    store = extract(tiny_job(tmp_path)).store
    made_by = runs.records(store.group)
    assert len(made_by) == 1
    run = made_by[0]
    assert (run["device"], run["decode"], run["tf32_convolutions"], run["tf32_matmuls"], run["pid"]) == (
        "cpu", "cpu", False, False, os.getpid())
    assert runs.differences(made_by) == {}
    assert extract(tiny_job(tmp_path)).backbone_images == 0 and len(runs.records(store.group)) == 1  # nothing written
    root = zarr.open_group(store.path, mode="r")
    (name, node), = root["runs"].groups()
    assert node.attrs["h2t_run"] == run and f"-{os.getpid()}-" in name
    info = store_info(store.path)
    assert info["runs"] == made_by and info["runs_differ_in"] == {}
    again = runs.record(store.group, run)  # the same process, the same second: another record, not an error
    assert again != name and runs.records(store.group) == [run, run]


def test_a_resume_made_otherwise_is_recorded_said_and_listed(tmp_path, capfd):
    store = extract(tiny_job(tmp_path)).store
    # the store as a GPU run would have left it: its record, one shard of train still to write
    group = zarr.open_group(store.path, mode="r+")
    group["train/shards_done"][0] = 0
    group.attrs["h2t"] = {**group.attrs["h2t"], "status": STATUS_WRITING}
    del group["runs"]  # made on the GPU box: its run is the only one
    runs.record(group, GPU_RUN)
    capfd.readouterr()
    resumed = extract(tiny_job(tmp_path))
    assert resumed.backbone_images > 0 and resumed.store.complete
    err = capfd.readouterr().err
    assert f"store {store.id} gets rows from runs that differ in device ['cpu', 'cuda']" in err and "decode" in err
    made_by = runs.records(open_store(store.path).group)
    assert [run["device"] for run in made_by] == ["cuda", "cpu"]  # oldest first
    assert runs.differences(made_by) == {"device": ["cpu", "cuda"], "decode": ["cpu", "nvjpeg"],
                                         "tf32_convolutions": [False, True]}
    assert store_info(store.path)["runs_differ_in"]["decode"] == ["cpu", "nvjpeg"]
    text = subprocess.run([sys.executable, "-m", "pipeline.cli", "store", "info", store.path], capture_output=True,
                          text=True, check=True).stdout
    assert "2 extraction process(es) wrote rows" in text and "forward on NVIDIA H200, TF32 convolutions" in text
    assert "the runs differ in decode: ['cpu', 'nvjpeg']" in text


def test_an_unreadable_record_is_listed_not_fatal(tmp_path):
    store = extract(tiny_job(tmp_path)).store
    (next((tmp_path / "stores").rglob("runs/*/zarr.json"))).write_text("{torn")
    made_by = runs.records(open_store(store.path).group)
    assert made_by[0].get("unreadable", "").startswith("runs/") and runs.differences(made_by) == {}
    assert "unreadable record runs/" in runs.describe(made_by[0])



def _record_after(path: str, start, results) -> None:
    group = zarr.open_group(path, mode="a")
    start.wait()
    try:
        runs.record(group, dict(GPU_RUN, pid=os.getpid()))
        results.put(None)
    except Exception as error:  # noqa: BLE001 - reported by the test
        results.put(repr(error))


def test_writers_starting_together_each_leave_their_record(tmp_path):
    """Several processes may make the store's first records at once: none fails on the `runs` group another
    made meanwhile (zarr's require_group did: ContainsGroupError in 11 of 60 such processes)."""
    context = multiprocessing.get_context("fork")
    for trial in range(5):
        path = str(tmp_path / f"s{trial}.zarr")
        zarr.open_group(path, mode="w", zarr_format=3).attrs["h2t"] = {"id": "x"}
        start, results = context.Barrier(6), context.Queue()
        processes = [context.Process(target=_record_after, args=(path, start, results)) for _ in range(6)]
        for process in processes:
            process.start()
        errors = [error for error in (results.get(timeout=60) for _ in processes) if error]
        for process in processes:
            process.join()
        assert not errors, errors
        assert len(runs.records(zarr.open_group(path, mode="r"))) == len(processes)
        assert dict(zarr.open_group(path, mode="r").attrs) == {"h2t": {"id": "x"}}  # the root's attributes kept


def test_a_cuda_runs_numbers_name_nvjpeg_and_the_tf32_switches_as_they_stand(tmp_path):
    """`run_numbers` needs no GPU to say what a CUDA run records: the device object is only read. This is the
    record's CUDA logic tested on the CPU (a lent GPU runs the real thing: benchmarks/gpu_check.sh)."""
    import torch

    from pipeline.config import settings
    from pipeline.extract import plan_store, run_numbers
    from tests.conftest import TINY_OVERRIDES, compose_cfg
    from tests.test_decode import write_jpeg_folder

    write_jpeg_folder(tmp_path / "images", per_class=3)
    model = [o for o in TINY_OVERRIDES if not o.startswith("data")]

    def numbers(device, *overrides):
        job = settings(compose_cfg("extract", model + ["data=folder", f"data.root={tmp_path / 'images'}",
                                                      f"store.root={tmp_path / 'stores'}", *overrides])).extract_job()
        return run_numbers(job, plan_store(job).dataset, torch.device(device))

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # module-like: no monkeypatch
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
        assert numbers("cuda:0", "extract.decode=device") == {
            "device": "cuda", "decode": "nvjpeg", "tf32_convolutions": True, "tf32_matmuls": False}
        assert numbers("cuda:0", "extract.decode=cpu")["decode"] == "cpu"
        assert numbers("cpu", "extract.decode=device") == {  # torchvision's CPU decode is libjpeg-turbo's
            "device": "cpu", "decode": "cpu", "tf32_convolutions": False, "tf32_matmuls": False}
        bf16 = numbers("cuda:0", "extract.decode=device", "model.precision=bfloat16")
        assert (bf16["tf32_convolutions"], bf16["tf32_matmuls"]) == (False, False)  # autocast, not TF32
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
        assert numbers("cuda:0", "extract.decode=device") == {
            "device": "cuda", "decode": "nvjpeg", "tf32_convolutions": False, "tf32_matmuls": True}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

"""Which machines computed a store's rows, and how: one record per extraction process that set out to write
some of them.

The store id hashes what the config fixes (the spec). Two things that change the numbers belong to the
machine instead. nvJPEG's pixels differ from libjpeg-turbo's by up to 57 levels (benchmarks/README.md,
decode.py). A CUDA float32 forward runs its convolutions in TF32 while cuDNN allows it, which is torch's
default (and its matrix products when the process allows that). Putting these in the id would stop the same
config from finding, on a CPU machine, a store that was extracted on a GPU. So every such process leaves its
own record instead: a zarr group `runs/<started>-<host>-<pid>-<random>` whose attributes hold it (`h2t_run`). Each
record is its own node, so concurrent writers never race on one object, and readers of the Zarr hierarchy
(zarr-python, xarray) see plain groups. `h2t store info` lists the records and says when they differ in a
field of `NUMBER_FIELDS`.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import re
import socket
import uuid

import zarr

from . import zarr_compat

GROUP, ATTR = "runs", "h2t_run"
# The fields that change the stored numbers. device: the forward's device type. decode: "nvjpeg" for JPEG
# files decoded on a CUDA device; "cpu" otherwise (libjpeg-turbo, the same pixels through every CPU path:
# tests/test_decode.py). tf32_convolutions / tf32_matmuls: a CUDA float32 forward whose convolutions (cuDNN,
# on by default) or matrix products (off by default) ran in TF32.
NUMBER_FIELDS = ("device", "decode", "tf32_convolutions", "tf32_matmuls")


def who() -> str:
    """user@host of this process (`created_by`, a run's `by`)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def new_record(**machine) -> dict:
    """This process's record: when, who, host and pid, then what its machine decided (`machine`: at least the
    fields of `NUMBER_FIELDS`)."""
    missing = set(NUMBER_FIELDS) - set(machine)
    if missing:
        raise ValueError(f"a run's record needs {sorted(missing)}")
    return {"started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "by": who(),
            "host": socket.gethostname(), "pid": os.getpid(), **machine}


def record(group: zarr.Group, entry: dict) -> str:
    """Write one run's record into the store (its root group); returns the record's name."""
    # unique per call: one process may start several runs within a second (a failed one, then another)
    tail = f"{entry['started_at']}-{entry['host']}-{entry['pid']}-{uuid.uuid4().hex[:8]}"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", tail)
    # made with its path: zarr creates a missing `runs` only if absent (require_group raced another writer's)
    group.create_group(f"{GROUP}/{name}", attributes={ATTR: entry})
    return name


def records(group: zarr.Group) -> list[dict]:
    """Every run's record, oldest first; one that cannot be read is listed as unreadable."""
    prefix = f"{group.path}/{GROUP}" if group.path else GROUP
    # listed from the store: zarr's own listing of the group stops at the first torn record
    try:
        names = sorted(set(zarr_compat.collect(group.store.list_dir(prefix))) - {"zarr.json"})
    except Exception:  # noqa: BLE001 - a location that cannot be listed: said, not fatal
        return [{"unreadable": f"{GROUP}/ (cannot be listed at this location)"}]
    out = []
    for name in names:
        try:
            entry = zarr.open_group(store=group.store, path=f"{prefix}/{name}", mode="r").attrs[ATTR]
        except Exception:  # noqa: BLE001 - a torn or foreign node: said, not fatal
            entry = None
        out.append(dict(entry) if isinstance(entry, dict) else {"unreadable": f"{GROUP}/{name}"})
    return out


def differences(entries: list[dict]) -> dict[str, list]:
    """The fields of `NUMBER_FIELDS` on which the runs differ, each with its distinct values."""
    out = {}
    for field in NUMBER_FIELDS:
        values = sorted({json.dumps(entry.get(field)) for entry in entries if "unreadable" not in entry})
        if len(values) > 1:
            out[field] = [json.loads(value) for value in values]
    return out


def describe(entry: dict) -> str:
    """One line for a run: when, who, where the forward ran and how the images were decoded."""
    if "unreadable" in entry:
        return f"unreadable record {entry['unreadable']}"
    device = entry.get("device_name") or entry.get("device")
    tf32 = "".join(f", TF32 {kind}" for kind in ("convolutions", "matmuls") if entry.get(f"tf32_{kind}"))
    return (f"{entry.get('started_at')} {entry.get('by')} (pid {entry.get('pid')}): forward on {device}{tf32}, "
            f"decode {entry.get('decode')}, writers in {entry.get('writers_in')}")

"""`h2t VERB ...`: the Hydra verbs (extract, probe, run, tune: pipeline/jobs.py) and the plain commands
(predict, report, store). Only what a verb uses is imported: `h2t store ls` does not load torch."""
from __future__ import annotations

import argparse
import json
import sys

from . import storage
from .config import CONF_DIR, register
from .errors import H2TError, fail
from .runtime import keep_freed_memory
from .storage import catalog, runs

__all__ = ["CONF_DIR", "main"]

VERBS = {
    "extract": "run the backbone over a dataset once and fill the store",
    "probe": "score, select and train a head from the store (method=head2toe|linear); -m for sweeps",
    "run": "extract if needed, probe head2toe and linear, print the comparison",
    "tune": "choose T, lam, F and the head's lr / steps on val or by K folds, refit on train+val, test once",
    "predict": "apply a saved head to images: h2t predict HEAD.pt|RUN_DIR IMAGES_OR_FOLDERS... [--out predictions.csv]",
    "report": "one table (markdown, CSV) and plots over a -m sweep or a tune folder: h2t report DIR",
    "store": "ls | info | verify | rm | gc: the stores under a root (h2t store -h)",
}
USAGE = "usage: h2t {" + ",".join(VERBS) + "} [key=value ...] [-m] [-q]\n" + "\n".join(
    f"  {verb:8s} {text}" for verb, text in VERBS.items())


def _predict_command(args: list[str]) -> None:
    from . import predict  # noqa: PLC0415 - start-up time: torch and timm only for the verbs that run a model
    parser = argparse.ArgumentParser(prog="h2t predict", description=VERBS["predict"])
    parser.add_argument("head", help="a <method>.head.pt written by probe, run or tune, or their output folder")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or .txt lists")
    parser.add_argument("--out", default="predictions.csv")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--method", default="head2toe", help="which head of an output folder (head2toe, linear, ...)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    opts = parser.parse_args(args)
    if opts.batch_size < 1:
        fail(f"--batch-size must be >= 1, got {opts.batch_size}")
    try:
        out, n, acc = predict.predict_files(opts.head, opts.images, opts.out, opts.batch_size, opts.device,
                                            not opts.quiet, opts.method)
    except H2TError as exc:
        fail(str(exc))
    tail = "" if acc is None else f"; accuracy against the folder names: {100 * acc:.1f} %"
    print(f"{n} predictions -> {out}{tail}")


def _report_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="h2t report", description=VERBS["report"])
    parser.add_argument("dir", help="a -m sweep folder (multirun/...), a tune or probe output folder")
    opts = parser.parse_args(args)
    try:
        from .report import write_report  # noqa: PLC0415 - matplotlib only for the verb that plots

        text, paths, failed = write_report(opts.dir)
    except H2TError as exc:
        fail(str(exc))
    print(text)
    print("\nwritten: " + ", ".join(str(p) for p in paths))
    if failed:
        fail(f"{len(failed)} failed job(s) in {opts.dir}, first: job {failed[0]['job']}: {failed[0].get('error')}")


def _store_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="h2t store", description="The stores under a root.")
    sub = parser.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("ls", help="list stores")
    ls.add_argument("root", nargs="?", default=catalog.default_root())
    ls.add_argument("--json", action="store_true")
    for name, text in (("info", "provenance and layer table"), ("verify", "read every shard, check checksums"),
                       ("rm", "delete a store")):
        p = sub.add_parser(name, help=text)
        p.add_argument("ref", help="store path, id or unique id prefix")
        p.add_argument("--root", default=catalog.default_root())
        if name == "info":
            p.add_argument("--json", action="store_true")
        if name == "rm":
            p.add_argument("--derived", action="store_true",
                           help="delete only the derived artefacts (cached scores, column views)")
    gc = sub.add_parser("gc", help="delete incomplete stores nobody wrote to for a while")
    gc.add_argument("root", nargs="?", default=catalog.default_root())
    gc.add_argument("--older-than-hours", type=float, default=24.0)
    gc.add_argument("--dry-run", action="store_true")
    opts = parser.parse_args(args)
    try:
        if opts.action == "ls":
            rows = catalog.list_summaries(opts.root)
            if opts.json:
                print(json.dumps(rows, indent=2))
                return
            print(f"{'id':16s}  {'status':9s} {'model':24s} {'dataset':20s} {'taps':>4s} {'features':>9s} "
                  f"{'size':>10s}  {'created':16s}  by")
            for r in rows:
                if "model" not in r:
                    print(f"{r['id']:16s}  {r['status']}")
                    continue
                print(f"{r['id']:16s}  {r['status']:9s} {r['model'][:24]:24s} {r['dataset'][:20]:20s} {r['taps']:4d} "
                      f"{r['features']:9d} {catalog.human_bytes(r['size_bytes']):>10s}  {catalog.age(r['created_at']):16s}"
                      f"  {r['created_by']}")
            return
        if opts.action == "gc":
            stale = catalog.abandoned(opts.root, opts.older_than_hours * 3600)
            for path in stale:
                print(f"{'would remove' if opts.dry_run else 'removed'} {path}")
                if not opts.dry_run:
                    catalog.remove(path)
            if not stale:
                print("no abandoned stores")
            return
        path = catalog.resolve(opts.ref, opts.root)
        if opts.action == "rm":
            if opts.derived:
                catalog.remove_derived(path)
                print(f"removed the derived artefacts of {path}")
                return
            catalog.remove(path)
            print(f"removed {path}")
            return
        store = catalog.open_resolved(path)
        if opts.action == "info":
            made_by = runs.records(store.group)
            info = {**catalog.summary(store), "spec": store.info.spec, "layers": store.layers,
                    "skipped": store.info.skipped, "runs": made_by, "runs_differ_in": runs.differences(made_by)}
            if opts.json:
                print(json.dumps(info, indent=2))
                return
            for key in ("id", "path", "status", "model", "dataset", "splits", "features", "created_at", "created_by"):
                print(f"{key:11s} {info[key]}")
            print(f"{'size':11s} {catalog.human_bytes(info['size_bytes'])}")
            print("provenance " + json.dumps(store.info.spec, sort_keys=True))
            print(f"{'runs':11s} {len(made_by)} extraction process(es) wrote rows" + ":" * bool(made_by))
            for entry in made_by:
                print(f"  {runs.describe(entry)}")
            for field, values in info["runs_differ_in"].items():
                print(f"  the runs differ in {field}: {values}; their rows' numbers differ slightly")
            print(f"\n{'#':>3s} {'tap':40s} {'role':18s} {'raw shape':>16s} {'dim':>7s} {'offset':>8s}  stored")
            dtypes = store.layer_dtypes()
            for i, layer in enumerate(store.layers):
                shape = "x".join(map(str, layer["raw_shape"]))
                source = f", copied from {layer['reused_from']}" if "reused_from" in layer else ""
                print(f"{i:3d} {layer['name'][:40]:40s} {layer['role'][:18]:18s} {shape:>16s} {layer['dim']:7d} "
                      f"{layer['offset']:8d}  {dtypes[layer['name']]}{source}")
            return
        problems = catalog.verify(store)
        for line in problems:
            print(line)
        if problems:
            fail(f"store {store.id} at {path}: {len(problems)} problem(s), first: {problems[0]}")
        print(f"store {store.id} at {path}: every shard present and its checksums match ({store.info.status})")
    except H2TError as exc:
        fail(str(exc))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        fail(f"unknown command {verb!r}\n{USAGE}")
    keep_freed_memory()  # every verb allocates large arrays: no page faults for each (pipeline/runtime.py)
    register()  # conf/<verb>.yaml start from the schema (pipeline/config.py)
    storage.configure_io()  # zarr's codec pipeline and I/O threads, for this command (pipeline/storage/__init__.py)
    if verb == "store":
        _store_command(rest)
    elif verb == "report":
        _report_command(rest)
    elif verb == "predict":
        _predict_command(rest)
    else:
        from . import jobs  # noqa: PLC0415 - start-up time: torch and timm only for the verbs that run a model

        jobs.run_verb(verb, rest)


if __name__ == "__main__":
    main()

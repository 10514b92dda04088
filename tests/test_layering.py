"""The package's shape: modules import only what comes before them in the data flow (docs/ARCHITECTURE.md),
so there is no import cycle; importing the package changes no process-wide setting."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# The data flow, upstream first: a module may import its own layer and the layers above it, never below.
LAYERS = [
    ("errors", "config", "runtime", "devices"),
    ("decode", "rows", "pooling", "select"),
    ("storage",),
    ("data",),
    ("backbone", "preprocess", "taps"),
    ("stages", "write_processes"),
    ("extract",),
    ("score",),
    ("head",),
    ("probe",),
    ("tune",),
    ("predict",),
    ("report",),
    ("jobs",),
    ("tasks",),
    ("cli",),
]
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports at module level (relative and absolute)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            found |= submodules or ({target} & modules)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
    return found - {name}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_place_in_the_data_flow():
    missing = sorted({_top(m) for m in _graph()} - set(LAYER_OF) - {""})
    assert not missing, f"place these modules in LAYERS (and docs/ARCHITECTURE.md): {missing}"


def test_modules_import_only_upstream_of_themselves():
    upward = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
              if _top(module) and _top(target) and LAYER_OF[_top(target)] > LAYER_OF[_top(module)]]
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_there_is_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_importing_the_package_changes_no_process_wide_setting():
    script = """
import warnings, zarr
from zarr.core import sync
# the libraries the package imports first: some install warning filters of their own at import
import torch, torchvision.io, timm, sklearn.model_selection, matplotlib.figure, hydra, dask.array, numcodecs  # noqa
import botocore.session, obstore  # noqa: F401 - urllib3 (under botocore) adds filters of its own
import torch._dynamo  # noqa: F401 - torch adds its own filters lazily
before = (dict(zarr.config.get("codec_pipeline")), len(warnings.filters), sync._get_loop()._default_executor)
import pipeline.cli, pipeline.storage, pipeline.extract, pipeline.tune, pipeline.predict  # noqa: F401
after = (dict(zarr.config.get("codec_pipeline")), len(warnings.filters), sync._get_loop()._default_executor)
assert before == after, (before, after)
from hydra.core.config_store import ConfigStore
assert "h2t_schema.yaml" not in ConfigStore.instance().repo  # the schema is registered by a command, not on import
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                         "PATH": str(Path(sys.executable).parent)}, cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-2000:]

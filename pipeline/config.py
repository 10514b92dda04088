"""The configuration schema as code: one dataclass per config group, enums for the closed choices, registered
with Hydra's ConfigStore. Every primary config (conf/extract.yaml, probe, run, tune) starts from its schema,
so a wrong type or an unknown choice (`method=ridge`, `head.lr=fast`, `store.dtype=float8`,
`pooling.cls_token=first`) is refused with one line when the config is composed, before any data is read.

The composed config becomes typed objects once, at the entry point (`settings`), and each stage receives the
narrow part it needs: `ExtractJob` (the store's recipe and how to run it), `ProbeJob` (score, select, head)
and `TuneJob` (the grid, over an extract and a probe job). Defaults live here only. Ranges (a fraction in
(0, 1], a positive lr) are checked by the stage that owns the setting, before any work
(`probe.check_settings`, `tune.check_job`, `extract.plan_store`). `data` stays free-form: each source names
and checks its own keys (pipeline/data/).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, cast

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .errors import H2TError

# The shipped configs (inside the package, found wherever h2t runs); H2T_CONF_DIR points elsewhere.
CONF_DIR = Path(os.environ.get("H2T_CONF_DIR", Path(__file__).resolve().parent / "conf"))


class Choice(str, Enum):
    """A closed choice that reads, prints and serialises as its plain value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)



class Method(Choice):
    head2toe = "head2toe"
    linear = "linear"
    per_layer = "per_layer"  # the linear head on each tap alone: which layer transfers best


class Solver(Choice):
    working_set = "working_set"
    fista = "fista"


class TieRule(Choice):
    gradient = "gradient"
    entry = "entry"


class HeadPrecision(Choice):
    """The dtype of the heads' matrix products (weights, Adam and the softmax stay float32)."""
    float32 = "float32"
    bfloat16 = "bfloat16"


class StoreDtype(Choice):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"
    int8 = "int8"


class OnOverflow(Choice):
    error = "error"
    widen = "widen"


class Compression(Choice):
    auto = "auto"
    lz4 = "lz4"
    zstd = "zstd"
    none = "none"


class PoolingRule(Choice):
    head2toe = "head2toe"


class ClsToken(Choice):
    pooled = "pooled"
    only = "only"
    separate = "separate"


class Precision(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Resize(Choice):
    center_crop = "center_crop"
    squash = "squash"
    border = "border"


class Interpolation(Choice):
    bilinear = "bilinear"
    bicubic = "bicubic"
    nearest = "nearest"


class Decode(Choice):
    auto = "auto"
    cpu = "cpu"
    device = "device"


class WritersIn(Choice):
    threads = "threads"
    processes = "processes"


class OnIncomplete(Choice):
    extract = "extract"
    wait = "wait"
    error = "error"


@dataclass
class ModelConfig:
    name: str = "???"
    pretrained: bool = True
    weights: Optional[str] = None
    checkpoint: Optional[str] = None
    download: bool = False
    seed: int = 0
    input_size: Optional[int] = None
    interpolation: Optional[Interpolation] = None
    resize: Optional[Resize] = None
    crop_pct: Optional[float] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    precision: Precision = Precision.float32
    use_test_size: bool = False


@dataclass
class PoolingConfig:
    rule: PoolingRule = PoolingRule.head2toe
    target_size: int = 1024
    cls_token: ClsToken = ClsToken.pooled


@dataclass
class TapsConfig:
    include: List[str] = field(default_factory=lambda: ["**"])
    exclude: List[str] = field(default_factory=list)


@dataclass
class S3Config:
    endpoint_url: Optional[str] = None
    profile: Optional[str] = None  # a profile of ~/.aws/credentials; keys themselves are never settings


@dataclass
class StoreConfig:
    root: str = "stores"
    dtype: StoreDtype = StoreDtype.float16
    on_overflow: OnOverflow = OnOverflow.error
    compression: Compression = Compression.auto
    col_chunk: Optional[int] = None  # by dtype: storage.schema.inner_columns
    s3: S3Config = field(default_factory=S3Config)
    column_views: bool = True
    view_fraction: float = 0.2


@dataclass
class ExtractConfig:
    batch_size: int = 64
    device: str = "auto"
    channels_last: bool = False
    progress: bool = True
    lease_s: float = 300
    poll_s: float = 0.5
    plan_only: bool = False
    workers: Optional[int] = None  # None: decode_workers() picks by device
    prefetch: int = 2
    writers: Optional[int] = None  # None: writer_threads() picks by device
    writers_in: WritersIn = WritersIn.threads
    replica: int = 0
    decode: Decode = Decode.auto


@dataclass
class ScoreConfig:
    lam: float = 1e-3
    solver: Solver = Solver.working_set
    max_iter: int = 50
    tol: float = 0.01
    memory_budget_mb: float = 2048
    cluster: Optional[str] = None


@dataclass
class SelectConfig:
    fraction: float = 0.1
    tie_rule: TieRule = TieRule.gradient
    entry_steps: int = 3


@dataclass
class HeadConfig:
    lr: float = 0.01
    steps: int = 1000
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"  # where heads train: auto is the CUDA device when there is one
    workers: Optional[int] = None  # tune's (and per-layer probes') groups of heads trained at once; None: one per torch thread on a CPU, else 1
    stack: Optional[bool] = None  # tune: each round's groups as one zero-padded computation (per-layer: all taps the budget holds); None: on a GPU only
    precision: HeadPrecision = HeadPrecision.float32  # the matrix products' dtype; bfloat16: ~2x faster on CPUs with bf16 dot products


@dataclass
class ProbeConfig:
    fit_on: List[str] = field(default_factory=lambda: ["train"])
    on_incomplete: OnIncomplete = OnIncomplete.extract
    wait_s: float = 3600


@dataclass
class LinearConfig:
    layer: str = "pre_logits"


@dataclass
class GridConfig:
    target_size: List[Optional[int]] = field(default_factory=lambda: [None])
    lam: List[float] = field(default_factory=list)
    fraction: List[float] = field(default_factory=list)
    head_lr: List[float] = field(default_factory=list)
    head_steps: List[int] = field(default_factory=list)


@dataclass
class TuneConfig:
    folds: int = 0
    seed: int = 0
    pool: List[str] = field(default_factory=lambda: ["train", "val"])
    grid: GridConfig = field(default_factory=GridConfig)
    plan_only: bool = False


@dataclass
class H2TConfig:
    """Every verb's config (extract uses the first six groups, probe / run / tune the rest as well)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    backbones: List[Any] = field(default_factory=list)  # several models: selection over all their layers
    data: Any = field(default_factory=dict)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    taps: TapsConfig = field(default_factory=TapsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    method: Method = Method.head2toe
    methods: List[Method] = field(default_factory=lambda: [Method.head2toe, Method.linear])
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


    def extract_job(self) -> ExtractJob:
        return ExtractJob(self.model, dict(self.data), self.pooling, self.taps, self.store, self.extract,
                          self.probe.on_incomplete, self.probe.wait_s, tuple(self.backbone_models()))

    def probe_job(self, method: Method | None = None) -> ProbeJob:
        return ProbeJob(Method(method or self.method), self.score, self.select, self.head, list(self.probe.fit_on),
                        self.linear.layer, self.store.column_views, self.store.view_fraction, self.model,
                        tuple(self.backbone_models()))

    def backbone_models(self) -> list[ModelConfig]:
        """`backbones`: each entry a model config of conf/model (`efficientnet_lite0`), a timm model name
        (`resnet18`), or overrides of `model` (`{input_size: 224}`), as typed model settings."""
        return [backbone_model(entry, self.model, f"backbones[{i}]") for i, entry in enumerate(self.backbones)]

    def tune_job(self) -> TuneJob:
        return TuneJob(self.tune, [Method(m) for m in self.methods], self.extract_job(), self.probe_job())


@dataclass(frozen=True)
class ExtractJob:
    """What extraction reads: the store's recipe (model, data, pooling, taps, store) and how to run it; a
    probe's policy for a store another process is still writing."""
    model: ModelConfig
    data: Dict[str, Any]
    pooling: PoolingConfig
    taps: TapsConfig
    store: StoreConfig
    extract: ExtractConfig
    on_incomplete: OnIncomplete = OnIncomplete.extract
    wait_s: float = 3600
    backbones: Tuple[ModelConfig, ...] = ()  # several models: one store each, read as one (storage/union.py)

    def members(self) -> list[ExtractJob]:
        """The job of each backbone's store (itself when it names one model)."""
        return [replace(self, model=model, backbones=()) for model in self.backbones] or [self]

    def with_target_size(self, target_size: int) -> ExtractJob:
        return replace(self, pooling=replace(self.pooling, target_size=int(target_size)))


@dataclass(frozen=True)
class ProbeJob:
    """What a probe reads: the method, scoring, selection and head settings, the rows it fits on, the column
    views it may use, and the model (saved with the head so that `h2t predict` can rebuild the backbone)."""
    method: Method
    score: ScoreConfig
    select: SelectConfig
    head: HeadConfig
    fit_on: List[str]
    linear_layer: str
    column_views: bool
    view_fraction: float
    model: ModelConfig
    backbones: Tuple[ModelConfig, ...] = ()  # the models of a union's members, saved with the head

    def models(self) -> list[ModelConfig]:
        """The model of each store the probe reads (one, or a union's members in order)."""
        return list(self.backbones) or [self.model]


@dataclass(frozen=True)
class TuneJob:
    """The protocol: its grid and rounds, the methods it tunes, the stores it extracts (one per T) and the
    probe it refits."""
    tune: TuneConfig
    methods: List[Method]
    extract: ExtractJob
    probe: ProbeJob


RUN_WIDE_MODEL_KEYS = ("download", "precision")  # how to run a model, not which one: `model.*` sets them for all


def backbone_model(entry: Any, model: ModelConfig, key: str) -> ModelConfig:
    """One entry of `backbones` as model settings; a wrong entry is one line naming it. A mapping without a
    `name` (or with `model`'s) overrides `model`; a name, alone or in a mapping, starts from that model's own
    config (conf/model/<name>.yaml, else a timm name), with `model`'s run-wide keys (download, precision)."""
    if not isinstance(entry, (str, dict)):
        raise H2TError(f"{key} must be a model config name, a timm model name or a mapping of model settings "
                       f"(e.g. {{input_size: 224}}), got {entry!r}")
    try:
        overrides = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = str(overrides.get("name", model.name))
        if name == model.name and not isinstance(entry, str):
            base = OmegaConf.structured(model)
        else:
            known = (CONF_DIR / "model" / f"{name}.yaml").is_file()
            base = OmegaConf.merge(model_group_config(name if known else "timm"),
                                   {k: getattr(model, k) for k in RUN_WIDE_MODEL_KEYS})
            overrides["name"] = base.name if known else name
        node = OmegaConf.merge(OmegaConf.structured(ModelConfig), base, overrides)
        return cast(ModelConfig, OmegaConf.to_object(node))
    except Exception as exc:  # noqa: BLE001 - OmegaConf's validation errors: one line naming the entry
        raise H2TError(f"{key}: {str(exc).splitlines()[0]}") from None


def model_group_config(name: str) -> DictConfig:
    """conf/model/<name>.yaml with the configs of its own defaults list merged under it (as Hydra would)."""
    node = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    assert isinstance(node, DictConfig)
    defaults = node.pop("defaults", [])
    bases = [model_group_config(str(d)) for d in defaults if str(d) != "_self_"]
    return cast(DictConfig, OmegaConf.merge(*bases, node)) if bases else node


def settings(cfg: DictConfig) -> H2TConfig:
    """The composed config as typed objects (enums for the closed choices), once, at the entry point."""
    return cast(H2TConfig, OmegaConf.to_object(cfg))


def register() -> None:
    """Make `h2t_schema` available to the primary configs' defaults lists (conf/<verb>.yaml)."""
    ConfigStore.instance().store(name="h2t_schema", node=H2TConfig)

"""The configuration schema as code: one dataclass per config group, enums for the closed choices, registered
with Hydra's ConfigStore. Every primary config (conf/extract.yaml, probe, run, tune) starts from its schema,
so a wrong type or an unknown choice (`method=ridge`, `head.lr=fast`, `store.dtype=float8`,
`pooling.cls_token=first`) is refused with one line when the config is composed, before any data is read.
Ranges (a fraction in (0, 1], a positive lr) are checked by the stage that owns the setting, also before any
work (`probe.check_settings`, `tune.check_config`, `extract.plan_store`). `data` stays free-form: each
source names and checks its own keys (pipeline/data/).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


class Choice(str, Enum):
    """A closed choice that reads, prints and serialises as its plain value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


Method = Choice("Method", {m: m for m in ("head2toe", "linear")})
Solver = Choice("Solver", {s: s for s in ("working_set", "fista")})
TieRule = Choice("TieRule", {s: s for s in ("gradient", "entry")})
StoreDtype = Choice("StoreDtype", {s: s for s in ("float16", "bfloat16", "float32", "int8")})
OnOverflow = Choice("OnOverflow", {s: s for s in ("error", "widen")})
Compression = Choice("Compression", {s: s for s in ("lz4", "zstd", "none")})
PoolingRule = Choice("PoolingRule", {"head2toe": "head2toe"})
ClsToken = Choice("ClsToken", {s: s for s in ("pooled", "only", "separate")})
Precision = Choice("Precision", {s: s for s in ("float32", "bfloat16", "float16")})
Resize = Choice("Resize", {s: s for s in ("center_crop", "squash", "border")})
Decode = Choice("Decode", {s: s for s in ("auto", "cpu", "device")})
OnIncomplete = Choice("OnIncomplete", {s: s for s in ("extract", "wait", "error")})


@dataclass
class ModelConfig:
    name: str = "???"
    pretrained: bool = True
    weights: Optional[str] = None
    checkpoint: Optional[str] = None
    download: bool = False
    seed: int = 0
    input_size: Optional[int] = None
    interpolation: Optional[str] = None
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
    compression: Compression = Compression.lz4
    col_chunk: int = 256
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
    workers: int = 4
    prefetch: int = 2
    writers: int = 2
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


@dataclass
class ProbeSettings:
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
class TuneSettings:
    folds: int = 0
    seed: int = 0
    pool: List[str] = field(default_factory=lambda: ["train", "val"])
    grid: GridConfig = field(default_factory=GridConfig)


@dataclass
class H2TConfig:
    """Every verb's config (extract uses the first six groups, probe / run / tune the rest as well)."""
    model: ModelConfig = field(default_factory=ModelConfig)
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
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    linear: LinearConfig = field(default_factory=LinearConfig)
    tune: TuneSettings = field(default_factory=TuneSettings)


def register() -> None:
    """Make `h2t_schema` available to the primary configs' defaults lists (conf/<verb>.yaml)."""
    ConfigStore.instance().store(name="h2t_schema", node=H2TConfig)

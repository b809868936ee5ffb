"""The packaged configs compose: every option of every config group, through the primary config that uses it, resolves
completely and names classes that exist; shared blocks and paths follow one another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict

from blendexp.config import CONF_DIR
from tests.conftest import REPO

PRIMARIES = ["train", "evaluate", "generate", "demo", "controllability", "build"]
# group -> (primary config that uses it, override selecting an option). Blocks used inside another group's configs
# (base, optim, adapter, annotators) are selected at their package, as Hydra records them in runtime.choices.
SELECT = {
    "data": ("train", "data={}"),
    "model": ("train", "model={}"),
    "trainer": ("train", "trainer={}"),
    "logger": ("train", "logger={}"),
    "callbacks": ("train", "callbacks={}"),
    "paths": ("train", "paths={}"),
    "hydra": ("train", "hydra={}"),
    "hydra/launcher": ("train", "hydra/launcher={}"),
    "experiment": ("train", "+experiment={}"),
    "eval": ("evaluate", "eval={}"),
    "data/build": ("build", "data/build={}"),
    "base": ("train", "base@model.base={}"),
    "optim": ("train", "optim@model.optim={}"),
    "adapter": ("train", "adapter@model.adapter={}"),
    "annotators": ("generate", "annotators@pipeline.annotators={}"),
}


def groups_on_disk() -> dict[str, list[str]]:
    """Every config group under blendexp/conf (a folder holding .yaml files) and its options."""
    return {str(d.relative_to(CONF_DIR)): sorted(f.stem for f in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.rglob("*")) if d.is_dir() and any(d.glob("*.yaml"))}


def resolved(primary: str, overrides: list[str], out: Path) -> tuple[DictConfig, dict[str, Any]]:
    """The composed config (with Hydra's node) and its fully resolved values, as a run in ``out`` would see them."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(primary, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg, OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def targets(node: Any) -> list[str]:
    """Every ``_target_`` in a resolved config."""
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for v in node.values() for t in targets(v)]
    return [t for v in node for t in targets(v)] if isinstance(node, list) else []


def test_every_group_has_a_way_to_select_it() -> None:
    assert set(groups_on_disk()) == set(SELECT), "add the new group to SELECT with the primary config that uses it"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in groups_on_disk().items() for o in opts])
def test_every_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    primary, template = SELECT[group]
    override = template.format(option)
    cfg, values = resolved(primary, [override], tmp_path)
    assert cfg.hydra.runtime.choices[override.split("=")[0].lstrip("+")] == option
    for target in targets({k: v for k, v in values.items() if k != "hydra"}):
        assert get_object(target) is not None, f"{group}={option}: _target_ {target} does not exist"


@pytest.mark.parametrize("primary", PRIMARIES)
def test_every_primary_config_resolves(primary: str, tmp_path: Path) -> None:
    _, values = resolved(primary, [], tmp_path)
    assert values["task_name"] == primary
    assert values["paths"]["root"] == str(REPO)  # run from a checkout: its data/, outputs/ and .cache/


def test_evaluation_base_follows_model_base(tmp_path: Path) -> None:
    _, values = resolved("train", ["+experiment=toy_base", "model.base.tiny_root=/somewhere"], tmp_path)
    assert values["evaluation"]["base"] == values["model"]["base"]
    assert values["evaluation"]["base"]["models"] == f"{values['paths']['toy_world']}/init/models"
    assert values["evaluation"]["base"]["tiny_root"] == "/somewhere"


def test_toy_world_and_shipped_toy_base_are_two_paths(tmp_path: Path) -> None:
    _, toy = resolved("train", ["data=toy", "paths.toy_world=/built/toy"], tmp_path)
    assert toy["data"]["sources"]["stills"]["shards"] == "/built/toy/shards/train-*.tar"
    assert toy["model"]["base"]["models"] == f"{toy['paths']['data']}/toy/models"  # the shipped base stays the base
    _, shipped = resolved("generate", ["paths.toy_base=/shipped"], tmp_path)
    assert shipped["pipeline"]["models_dir"] == "/shipped/models"
    assert shipped["pipeline"]["annotators"]["smirk"] == "/shipped/models/smirk/SMIRK_em1.pt"


def test_shared_blocks_are_overridable_where_they_are_used(tmp_path: Path) -> None:
    _, values = resolved("train", ["+experiment=ref_adapter", "model.adapter.num_tokens=8", "model.optim.lr=0.5"],
                         tmp_path)
    assert values["model"]["adapter"]["num_tokens"] == 8 and values["model"]["adapter"]["input_scale"]["jaw"] == 10.0
    assert values["model"]["optim"]["lr"] == 0.5 and values["model"]["optim"]["betas"] == [0.9, 0.999]
    _, ev = resolved("evaluate", ["eval=official"], tmp_path)
    assert ev["eval"]["annotators"]["detector"] == "auto" and ev["eval"]["annotators"]["smirk_swap_rb"] is False

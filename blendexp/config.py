"""OmegaConf resolvers used by the configs (imported by every entry point before Hydra composes)."""

from __future__ import annotations

import hashlib
import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = Path(__file__).resolve().parent / "conf"  # packaged configs: the entry points' config_path


def wandb_offline() -> bool:
    """Run W&B offline unless an API key is configured (env var or ~/.netrc), so runs never block on login."""
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def run_id(run_dir: str) -> str:
    """A W&B run id derived from the run folder, so a requeued or resumed job continues the same W&B run."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def sweep_name() -> str | None:
    """The sweep folder's name in a multirun (the W&B group of its jobs); None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def job_name(single: str) -> str:
    """``<sweep>-<job number>`` in a multirun, where every job shares the sweep's ``run_name``; else ``single``."""
    from hydra.core.hydra_config import HydraConfig

    sweep = sweep_name()
    return f"{sweep}-{HydraConfig.get().job.num}" if sweep else single


def register_resolvers() -> None:
    """Make the ``${blendexp.*}`` resolvers available (idempotent)."""
    OmegaConf.register_new_resolver("blendexp.root", lambda: str(REPO_ROOT), replace=True)
    OmegaConf.register_new_resolver("blendexp.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("blendexp.run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("blendexp.sweep_name", sweep_name, replace=True)
    OmegaConf.register_new_resolver("blendexp.job_name", job_name, replace=True)


register_resolvers()

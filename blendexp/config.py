"""OmegaConf resolvers used by the configs (imported by every entry point before Hydra composes), and where the
project's folders are when the package runs from a checkout or from an installed wheel."""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import types
import typing
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when the package runs from one
CONF_DIR = Path(__file__).resolve().parent / "conf"  # packaged configs: the entry points' config_path
ROOT_ENV = "BLENDEXP_ROOT"
log = logging.getLogger(__name__)


def project_root() -> str:
    """``paths.root``: ``$BLENDEXP_ROOT``, else the checkout the package runs from (source or editable install), else
    the working directory (an installed wheel: outputs land where the command runs, not in site-packages)."""
    if os.environ.get(ROOT_ENV):
        return str(Path(os.environ[ROOT_ENV]).expanduser().resolve())
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "data").is_dir():
        return str(REPO_ROOT)
    return str(Path.cwd())


class CheckEmbeddedData(Callback):
    """Name what is missing when the embedded default's folder (``paths.data``: sample shards, shipped toy base) is
    absent, as from an installed wheel run outside a checkout; the loaders then name the exact file."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Log one actionable line before anything loads (a warning: a run given its own inputs does not need it)."""
        data = Path(str(config.paths.data))
        if not data.is_dir():
            log.warning("paths.data=%s does not exist, so the embedded default's inputs (sample shards data/sample, "
                        "toy base data/toy) are missing: they ship with the repository, not the wheel; run from a "
                        "checkout, set %s=<checkout> or paths.data=<checkout>/data, or give your own inputs",
                        data, ROOT_ENV)


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


SIMPLE_TYPES = (bool, int, float, str, type(None))


def _simple_types(hint: Any) -> tuple[type, ...]:
    """The plain types an annotation allows (``float`` also takes ``int``); empty when it allows anything richer."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not all(a in SIMPLE_TYPES for a in args):
        return ()
    return tuple(args) + ((int,) if float in args else ())


def check_types(node: DictConfig, key: str) -> None:
    """A value whose type contradicts its ``_target_``'s annotation fails naming the key (``trainer.max_steps=abc``
    would otherwise be a TypeError deep inside Lightning that names no key)."""
    from hydra.utils import get_object

    target = get_object(str(node._target_))
    try:
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # noqa: BLE001 - annotations that cannot be resolved here are left to the target
        return
    for name, value in node.items():
        allowed = _simple_types(hints.get(str(name)))
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed if t is not int or
                                float not in allowed)
            raise ValueError(f"{key}.{name}={value!r} has the wrong type; expected {names}")


def register_resolvers() -> None:
    """Make the ``${blendexp.*}`` resolvers available (idempotent)."""
    OmegaConf.register_new_resolver("blendexp.root", project_root, replace=True)
    OmegaConf.register_new_resolver("blendexp.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("blendexp.run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("blendexp.sweep_name", sweep_name, replace=True)
    OmegaConf.register_new_resolver("blendexp.job_name", job_name, replace=True)


register_resolvers()

"""OmegaConf resolvers used by the configs (imported by every entry point before Hydra composes)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def register_resolvers() -> None:
    """Make ``${blendexp.root:}`` and ``${blendexp.wandb_offline:}`` available (idempotent)."""
    OmegaConf.register_new_resolver("blendexp.root", lambda: str(REPO_ROOT), replace=True)
    OmegaConf.register_new_resolver("blendexp.wandb_offline", wandb_offline, replace=True)


register_resolvers()

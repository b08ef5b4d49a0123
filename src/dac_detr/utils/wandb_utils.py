"""Weights & Biases: offline when there is no API key or no network, one run per job, clean finish.

``wandb`` is imported lazily, only when ``logger=wandb`` is chosen.
"""

from __future__ import annotations

import netrc
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.utilities import rank_zero_info


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _can_reach_wandb(timeout_s: float = 2.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def wandb_should_run_offline(requested_offline: bool) -> tuple[bool, str]:
    """Decide offline mode; returns (offline, reason). ``WANDB_MODE`` set by the user always wins."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun"):
        return True, "WANDB_MODE=offline"
    if mode == "disabled":
        return True, "WANDB_MODE=disabled"
    if requested_offline:
        return True, "logger.wandb.offline=true"
    if not _has_api_key():
        return True, "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if not _can_reach_wandb():
        return True, "the W&B server cannot be reached"
    return False, ""


def finish_wandb_run() -> None:
    """Close the active W&B run, if any, so the next Hydra multirun job starts its own run."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    offline = bool(getattr(wandb.run.settings, "_offline", False)) or wandb.run.settings.mode == "offline"
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    if offline:
        rank_zero_info(f"W&B ran offline; upload the run later with: wandb sync {run_dir}")

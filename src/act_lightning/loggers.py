"""A CSV logger that a resumed run appends to (`metrics.csv` holds every logged row once), and when the
W&B logger runs offline."""

from __future__ import annotations

import configparser
import logging
import netrc
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from act_lightning.compat import ResumableExperimentWriter

log = logging.getLogger(__name__)
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that continues a resumed run's metrics.csv (`resume_step`:
    the checkpoint's iteration, or None for a fresh run)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:  # as CSVLogger.experiment, with the writer that keeps the rows
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(self.log_dir, self._resume_step)
        return self._experiment


# W&B's cloud under both its names: wandb 0.31 logs in to CoreWeave's Forge by default, which serves the
# API of api.wandb.ai; a `wandb login` with either version writes one of the two into the netrc
WANDB_CLOUD = ("api.wandb.ai", "api.forge.coreweave.com")


def wandb_base_url() -> str:
    """W&B's server as wandb itself finds it: WANDB_BASE_URL, else the `base_url` that `wandb login --host`
    writes into wandb's settings file, else the installed wandb's default."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    folder = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(folder / "settings")
        url = parser.get("default", "base_url", fallback=None)
    except (configparser.Error, OSError):
        url = None
    if url:
        return url
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL  # wandb 0.31 and later
    except ImportError:
        return "https://api.wandb.ai"
    return DEFAULT_BASE_URL


def wandb_host() -> tuple[str, int]:
    url = urlsplit(wandb_base_url())
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_key_configured() -> bool:
    """True when W&B can authenticate without prompting: WANDB_API_KEY or a `wandb login` netrc entry for
    its server (the netrc that NETRC names, as wandb reads it; either name of W&B's cloud). The key
    itself is never read into logs."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = wandb_host()[0]
    hosts = WANDB_CLOUD if host in WANDB_CLOUD else (host,)
    try:
        entries = netrc.netrc(os.environ.get("NETRC") or None)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any(entries.authenticators(name) is not None for name in hosts)


def unreachable(host: str, port: int, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to host:port fails (name lookup included), or None when it opens within
    `timeout` seconds."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or type(err).__name__)

    thread = threading.Thread(target=connect, daemon=True)  # a name lookup ignores the socket's timeout
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def check_wandb_names(logger_cfg) -> None:
    """W&B's own rule for a project's name (its settings refuse it in `wandb.init`, after the data and the
    networks are set up, with a traceback), checked with the other options; `logger_cfg`: logger.wandb."""
    project = logger_cfg.get("project")
    if project is None:
        return
    text, bad = str(project), sorted(set("/\\#?%:") & set(str(project)))
    if len(text) > 128 or bad:
        found = f"it holds {' '.join(bad)}" if bad else f"it has {len(text)} characters"
        raise ValueError(
            f"logger.wandb.project={text!r}: W&B accepts a project name of at most 128 characters without "
            f"any of / \\ # ? % : ({found}); the team or user it belongs to is logger.wandb.entity"
        )


def wandb_offline(logger_cfg) -> bool:
    """Whether the W&B logger runs offline: when asked to (`offline`, WANDB_MODE), when no API key is
    configured (instead of prompting for one), or when W&B's server cannot be reached (at once, instead of
    W&B's minutes of retries and an error). Behind a proxy the server is not probed. Each case is said in
    one line; `wandb sync` uploads an offline run later."""
    if logger_cfg.get("offline") or os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
        return True
    if os.environ.get("WANDB_MODE") == "disabled":  # W&B off altogether: no offline run written either
        return False
    sync = f"upload it later with `wandb sync {logger_cfg.get('save_dir', '.')}/wandb/offline-run-*`"
    if not wandb_key_configured():
        log.warning("No W&B API key configured: logging offline; %s", sync)
        return True
    if any(os.environ.get(name) for name in PROXIES):
        return False
    host, port = wandb_host()
    reason = unreachable(host, port)
    if reason is not None:
        log.warning(
            "W&B's server %s:%d cannot be reached (%s): logging offline; %s", host, port, reason, sync
        )
        return True
    return False

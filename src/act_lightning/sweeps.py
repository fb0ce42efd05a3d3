"""Checks of a launch that read Hydra's record of it (its overrides, mode and sweeper), made before
anything is written: mostly of a launch that belongs to a sweep (Hydra's -m: the ablations,
hparams_search=optuna), what would otherwise train for hours and then mean nothing."""

from __future__ import annotations

import difflib

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

EQUAL_TIME = "ct_equal_time"  # conf/variant/ct_equal_time.yaml: the quickstart's plain CT at ACT's wall time
OPTIONAL_KEYS = ("init_sweep",)  # top-level keys no config need define that a config reads (oc.select)


def check_sweep(cfg: DictConfig) -> None:
    """The sweep checks of this launch; none outside Hydra (a config composed in Python)."""
    if not HydraConfig.initialized():
        return
    check_sweep_is_a_multirun()
    check_added_keys(cfg)
    check_equal_time_variant(cfg)
    check_optuna_has_a_metric(cfg)


def check_added_keys(cfg: DictConfig) -> None:
    """A top-level key added with `+key=value` that no config defines: nothing reads it. Hydra's message
    for a misspelt key (`iteration=20`) suggests `+iteration=20`, which then trained the config's length
    without a word (nested keys are refused where their class is built)."""
    groups = HydraConfig.get().runtime.choices  # +group=option adds a config group's choice: a config
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0]
        if not key.startswith("+") or key.startswith("++"):
            continue
        name = key[1:]
        if "." in name or "@" in name or name in OPTIONAL_KEYS or name in groups:
            continue
        near = difflib.get_close_matches(name, [str(k) for k in cfg if k != name], n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(
            f"{override}: {name} is not a key of the training config and nothing reads it{hint}; "
            "`--cfg job` prints the config's keys"
        )


def check_sweep_is_a_multirun() -> None:
    """A config that sweeps (`hydra.sweeper.params`: the ablations, hparams_search=optuna) launched without
    -m would train one run at its defaults and look like the sweep's success: refused, naming the group."""
    if HydraConfig.get().mode != RunMode.RUN:
        return
    hydra_cfg = HydraConfig.get()
    params = OmegaConf.select(hydra_cfg, "sweeper.params")
    if not params:
        return
    choices = hydra_cfg.runtime.choices
    groups = [
        f"{g}={choices[g]}" for g in ("ablation", "hparams_search") if choices.get(g) not in (None, "null")
    ]
    what = " ".join(groups) or "hydra.sweeper.params"
    raise ValueError(
        f"{what} is a sweep over {', '.join(params)}: launch it with -m (python -m act_lightning.train -m "
        f"{what} ...); without -m one run would train at the defaults"
    )


def check_equal_time_variant(cfg: DictConfig) -> None:
    """variant=ct_equal_time is the quickstart's plain CT at ACT's wall time there: 1280 iterations, 1.6
    times the quickstart's 800, as measured on two CPU cores. Another length on the command line, or
    another experiment, makes it another variant (with iterations=40 it is variant ct again, and the
    report shows the two alike): refused, with the way to give an equal-time length."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.runtime.choices.get("variant") != EQUAL_TIME:
        return
    given = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") == "iterations"]
    experiment = hydra_cfg.runtime.choices.get("experiment")
    if given or experiment != "quickstart":
        why = given[0] if given else f"experiment={experiment}"
        raise ValueError(
            f"variant={EQUAL_TIME} with {why}: the variant is the quickstart's plain consistency training "
            "at ACT's wall time there (1280 iterations against ACT's 800, measured on two CPU cores); for "
            "another length or experiment, time ACT's iteration against plain CT's and give the equal-time "
            "length yourself: variant=ct iterations=N"
        )


def check_optuna_has_a_metric(cfg: DictConfig) -> None:
    """hparams_search=optuna minimises each trial's best evaluation; with eval=null a trial has none, and
    every trial trained in full before Hydra said so ("Return value must be float-castable")."""
    sweeper = str(OmegaConf.select(HydraConfig.get(), "sweeper._target_", default="") or "")
    if "optuna" in sweeper.lower() and cfg.get("eval") is None:
        raise ValueError(
            "eval=null under hydra/sweeper=optuna: the study minimises each trial's best evaluation "
            "(val/fid, the quickstart's val/fd), which a run without evaluation does not have; keep eval "
            "(eval.every sets how often it runs)"
        )

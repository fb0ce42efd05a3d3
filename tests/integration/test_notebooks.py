"""The notebooks run, top to bottom, against runs the test makes (nbclient); they are kept without
outputs in git."""

from __future__ import annotations

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from act_lightning.train import train
from tests.conftest import ROOT, compose

NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny quickstart-shaped runs with an evaluation history, as the jobs of a sweep."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        overrides = ["debug=smoke", "data=synthetic", "iterations=4", "eval.every=2", f"seed={seed}"]
        train(compose(overrides, run_dir=str(root / "multirun" / f"job{seed}")))
    return root


def _execute(name: str, cwd, env: dict, monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return notebook


def test_the_notebooks_are_stored_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_sample_and_edit.ipynb", "02_training_curves.ipynb"]
    for name in names:
        for cell in nbformat.read(NOTEBOOKS / name, as_version=4).cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name


@pytest.mark.slow
def test_sample_and_edit_runs_on_the_newest_best_checkpoint_from_the_notebooks_folder(runs, monkeypatch):
    """Jupyter starts the kernel in the notebook's folder: the default search found no checkpoint there
    (it looked in outputs/quickstart/*/*/ of the working folder only)."""
    monkeypatch.delenv("ACT_CKPT", raising=False)
    (runs / "notebooks").mkdir(exist_ok=True)
    newest = max(runs.glob("multirun/*/checkpoints/best.ckpt"), key=lambda p: p.stat().st_mtime)
    # a diffusion model's, newer (the README's first diffusion command writes one): the notebook's
    # one-step sampling failed on it; it is passed over
    later = runs / "outputs" / "digits_diffusion" / "checkpoints" / "best.ckpt"
    later.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "act_config": {"model": {"objective": "diffusion"}}}, later)
    notebook = _execute("01_sample_and_edit.ipynb", runs / "notebooks", {}, monkeypatch)
    printed = "".join(o.get("text", "") for o in notebook.cells[1].outputs)
    assert f"{newest} iteration" in printed, printed
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2  # the sampling figure and the editing figure


def test_training_curves_plot_every_job_of_a_sweep(runs, monkeypatch):
    # by default every run under multirun/ at any depth (the jobs lie one folder down, as make
    # reproduce-mini's do; the default looked four down only), else the ACT_RUNS glob's
    monkeypatch.delenv("ACT_RUNS", raising=False)
    (runs / "notebooks").mkdir(exist_ok=True)
    aside = runs / "multirun" / "job0" / "replaced" / "2026-12-07_10-00-00-000000"  # set aside by a new run
    aside.mkdir(parents=True, exist_ok=True)
    (aside / "metric_summary.json").write_bytes(
        (runs / "multirun" / "job0" / "metric_summary.json").read_bytes()
    )
    for cwd in (runs, runs / "notebooks"):  # the kernel in the repository's notebooks/: its parent's runs
        notebook = _execute("02_training_curves.ipynb", cwd, {}, monkeypatch)
        text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
        assert "job0" in text and "job1" in text and "replaced" not in text
    notebook = _execute(
        "02_training_curves.ipynb", runs, {"ACT_RUNS": str(runs / "multirun" / "job1")}, monkeypatch
    )
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "job0" not in text and "job1" in text
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2

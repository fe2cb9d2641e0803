"""Shared fixtures: a tiny toy world built through the real code (no hub, no downloads)."""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / ".test" / "config.yaml"


def tiny_config() -> dict:
    return yaml.safe_load(TINY.read_text())


def without_venv() -> dict:
    """The environment of a shell that never activated the venv: no directory on PATH has a
    ``stagediff`` (the rules must find it through the Python that runs Snakemake)."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "stagediff").is_file())
    return env


def run_smk(*args, cwd, check=True):
    """``<venv>/bin/python -m snakemake …`` as a user types ``.venv/bin/snakemake …``, unactivated."""
    env = without_venv()
    r = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, text=True,
                       capture_output=True)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def killed_run(cwd, *args, when) -> None:
    """Snakemake with ``args``, SIGKILLed with all its jobs as soon as ``when()`` holds."""
    p = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=without_venv(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not when() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p.poll() is None, f"snakemake {' '.join(args)} ended (rc {p.returncode}) before the moment to kill it"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def summary(configfile: str, cwd) -> dict[str, str]:
    """output file -> Snakemake's plan for it ("no update", "update pending", ...)."""
    out = run_smk("--summary", "--configfile", configfile, cwd=cwd).stdout
    rows = csv.DictReader(io.StringIO(out[out.index("output_file"):]), delimiter="\t")
    return {r["output_file"]: r["plan"] for r in rows}


def stale_after(configfile: str, cwd, edit) -> set[str]:
    """The outputs a config edit would make stale (the config is restored afterwards)."""
    path = Path(cwd) / configfile
    text = path.read_text()
    changed = yaml.safe_load(text)
    edit(changed)
    path.write_text(yaml.safe_dump(changed))
    try:
        return {f for f, plan in summary(configfile, cwd).items() if plan != "no update"}
    finally:
        path.write_text(text)


@pytest.fixture
def workdir(tmp_path):
    """A copy of the workflow to run Snakemake in."""
    for item in ["Snakefile", "workflow", "config", "envs", ".test"]:
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / item)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Tiny data, base LM and (untrained-length) VLM made by the same functions the rules call."""
    from stagediff import config as sdc
    from stagediff.data.toy_world import generate_toy_world
    from stagediff.models.toy_lm import corpus_lines, train_base_lm
    from stagediff.models.toy_vlm import train_toy_vlm

    root = tmp_path_factory.mktemp("world")
    raw = tiny_config()
    raw["toy"]["root"] = str(root)
    cfg = sdc.validate(raw)
    t = cfg["toy"]
    generate_toy_world(root / "data", t["data"], cfg["seed"])
    train_base_lm(root / "data" / "corpus.txt", root / "base_lm", t["base_lm"], cfg["seed"])
    train_toy_vlm(root / "base_lm", cfg["data"], cfg["prompts"], root / "vlm", t["vlm"], t["data"]["image_size"],
                  cfg["seed"], text=corpus_lines(root / "data" / "corpus.txt", t["drift_lines"], rest=True))
    return cfg


def first_block_input(model, batch):
    """The embeddings the decoder sees (the input of block 0); the forward stops there."""
    import torch

    from stagediff.capture import StopForward

    seen = {}

    def hook(_m, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
        raise StopForward

    h = model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    except StopForward:
        pass
    finally:
        h.remove()
    return seen["x"]

"""Results as pandas DataFrames, for notebooks and figure scripts.

    from stagediff.api import load_table, list_tables
    list_tables()                                   # tables of the default (toy) run
    df = load_table("adapted_features")             # results/toy/tables/adapted_features.parquet
    df = load_table("ablation", "config/llava_more.yaml")
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml


def results_dir(config: str | Path = "config/config.yaml", root: str | Path = ".") -> Path:
    """``<root>/results/<name>``, ``name`` from the config (the run's output folder)."""
    path = Path(root) / config
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    name = (yaml.safe_load(path.read_text()) or {}).get("name")
    if not name:
        raise KeyError(f"{path}: config key name is missing")
    return Path(root) / "results" / name


def list_tables(config: str | Path = "config/config.yaml", root: str | Path = ".") -> list[str]:
    return sorted(p.stem for p in (results_dir(config, root) / "tables").glob("*.parquet"))


def load_table(name: str, config: str | Path = "config/config.yaml", root: str | Path = ".") -> pd.DataFrame:
    """One result table (``results/<run>/tables/<name>.parquet``) as a DataFrame."""
    path = results_dir(config, root) / "tables" / f"{name}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no table {name!r} at {path}; the run has: {', '.join(list_tables(config, root)) or 'none yet'}")
    return pd.read_parquet(path)

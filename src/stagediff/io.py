"""Atomic outputs: write to a temporary sibling, rename at the end.

A killed job therefore never leaves a file or directory that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary file path that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def save_figure(fig, folder: str | Path, name: str) -> None:
    """A matplotlib figure as ``<name>.png`` and ``<name>.pdf`` (paper figures come in both), then closed."""
    import matplotlib.pyplot as plt  # here, not at import: most commands draw nothing

    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(Path(folder) / f"{name}.{ext}", dpi=150)
    plt.close(fig)


def write_json(obj, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def markdown_table(t: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (floats to 2 decimals), without extra dependencies."""
    cell = lambda x: f"{x:.2f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in t.itertuples(index=False)])

"""Atomic outputs: write to a temporary sibling, rename at the end.

A killed job therefore never leaves a file or directory that looks finished.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it does, and is someone else's
        pass
    return True


def clear_stale(path: Path) -> None:
    """Remove the temporaries that killed writers of ``path`` left (their process is gone)."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a killed job", old)
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def drop_unmarked(paths, marker: str) -> list[Path]:
    """Remove every directory in ``paths`` that exists without its completion ``marker`` file
    (an activation store's COMPLETE), so the workflow sees it missing and makes it again instead
    of every reader refusing it; returns the ones removed. Such outputs appear by rename with the
    marker inside, so one being written is never among them."""
    dropped = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / marker).is_file():
            log.warning("%s has no %s marker: removed, it will be made again", p, marker)
            shutil.rmtree(p)
            dropped.append(p)
    return dropped


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
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
    clear_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def read_json(path: str | Path):
    """A JSON file's content; a file that does not parse is one error naming it (and where)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is truncated or damaged") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e})") from None


def read_safetensors(path: str | Path) -> dict:
    """A safetensors file's tensors (CPU); a damaged or truncated file is one error naming it
    (safetensors' own errors name no file)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean the file is unusable
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None


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

"""The SLURM profile on a real single-node SLURM (tests/slurm/start_slurm.sh): every job goes
through sbatch, GPU rules get a GPU allocation and CPU rules none, and the tables equal a local run.

Needs root to start the cluster; CI sets STAGEDIFF_REQUIRE_SLURM=1 so that a missing cluster
fails there instead of skipping.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, run_smk

# Two regimes instead of four: the same rules, half the SAE jobs on a 2-core node. Device auto, as a
# cluster config would have it: the fake GPUs are allocated but unusable, so jobs fall back to CPU.
OVERLAY = {"device": "auto", "sae_finetune": {"regimes": ["full", "text"]}}
TABLES = ["vlm_accuracy", "sae_fvu", "adapted_features", "shift", "selected_features"]
# the jobs that run the VLM or an SAE ask for a GPU; aggregation and figures do not
GPU_RULES = {"vlm_accuracy", "cache_activations_g0", "sae_finetune", "sae_finetune_shared", "sae_evaluate",
             "diff_layer", "shift_layer", "neutral"}


def _node_up() -> bool:
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True) if shutil.which("sinfo") else None
    return bool(r and r.returncode == 0 and re.search(r"idle|mix|alloc", r.stdout))


@pytest.fixture(scope="module")
def slurm_cluster():
    if not _node_up():
        if os.geteuid() != 0:
            if os.environ.get("STAGEDIFF_REQUIRE_SLURM") == "1":
                pytest.fail("no SLURM cluster and not root: cannot run tests/slurm/start_slurm.sh")
            pytest.skip("no SLURM cluster here and not root to start one (tests/slurm/start_slurm.sh)")
        subprocess.run([str(REPO / "tests" / "slurm" / "start_slurm.sh")], check=True, timeout=900)
    assert _node_up()


def _config(workdir: Path) -> list[str]:
    cfg = yaml.safe_load((workdir / ".test" / "config.yaml").read_text())
    cfg["device"] = OVERLAY["device"]
    cfg["sae_finetune"].update(OVERLAY["sae_finetune"])
    (workdir / "slurm.yaml").write_text(yaml.safe_dump(cfg))
    # targets first: --configfile and --quiet take every word after them
    return [*(f"results/tiny/tables/{t}.parquet" for t in TABLES), "--configfile", "slurm.yaml"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("results", "logs", ".snakemake"))
    return dst


def _jobs(workdir: Path) -> dict[str, list[str]]:
    """rule -> SLURM job ids, from the plugin's per-job logs (logs/slurm/rule_<rule>/.../<id>.log)."""
    jobs: dict[str, list[str]] = {}
    for log in (workdir / "logs" / "slurm").rglob("*.log"):
        rule = next(p for p in log.relative_to(workdir / "logs" / "slurm").parts if p.startswith("rule_"))
        jobs.setdefault(rule.removeprefix("rule_"), []).append(log.stem)
    return jobs


def _seen_inside(workdir: Path) -> dict[str, str]:
    """SLURM job id -> CUDA_VISIBLE_DEVICES, as the stagediff command logged it inside the job."""
    seen = {}
    for log in (workdir / "logs" / "tiny").rglob("*.log"):
        for m in re.finditer(r"\(SLURM job (\S+), CUDA_VISIBLE_DEVICES=(\S*)\)", log.read_text()):
            seen[m.group(1)] = m.group(2)
    return seen


def _gpus_requested(job_id: str) -> int:
    """GPUs the job asked SLURM for (scontrol keeps finished jobs for MinJobAge seconds)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    m = re.search(r"TresPerJob=\S*gres:gpu:(\d+)", out)
    return int(m.group(1)) if m else 0


@pytest.mark.workflow
def test_profile_runs_every_job_through_sbatch_and_matches_a_local_run(slurm_cluster, workdir, tmp_path):
    shutil.copytree(REPO / "slurm", workdir / "slurm")
    local, cluster = _copy(workdir, tmp_path / "local"), _copy(workdir, tmp_path / "cluster")
    # one thread per job on both sides: two jobs share the 2-core node, and float sums (FVU) are
    # bitwise equal only at equal thread counts (across counts they agree to ~1e-6)
    run_smk("--cores", "2", "--max-threads", "1", *_config(local), cwd=local)
    r = run_smk("--profile", "slurm", *_config(cluster), "--slurm-status-command", "squeue",
                "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
                "--max-threads", "1", cwd=cluster)
    jobs = _jobs(cluster)
    stats = run_smk(*_config(local), "-n", "-F", "--quiet", "rules", cwd=local).stdout
    planned = set(re.findall(r"^(\w+) +\d+$", stats, re.M)) - {"all", "total"}
    # every rule of the run went through sbatch, each job with its own SLURM job id
    assert set(jobs) == planned, r.stdout[-2000:] + r.stderr[-2000:]
    seen = _seen_inside(cluster)
    for rule, ids in jobs.items():
        for job_id in ids:
            assert job_id in seen, f"{rule}: no log line from inside SLURM job {job_id}"
            # asked for one GPU, and SLURM's GRES allocation set CUDA_VISIBLE_DEVICES in the job
            if rule in GPU_RULES:
                assert _gpus_requested(job_id) == 1 and seen[job_id] not in ("", "-"), (rule, job_id, seen[job_id])
            else:
                assert _gpus_requested(job_id) == 0 and seen[job_id] == "-", (rule, job_id, seen[job_id])
    assert GPU_RULES <= set(jobs)
    # the fake GPUs have no CUDA behind them: the job says so and runs on the CPU
    cache_log = cluster / "logs" / "tiny" / "cache_activations_g0.log"
    assert "CUDA is not usable; falling back to CPU" in cache_log.read_text()
    for t in TABLES:
        a = pd.read_parquet(local / "results" / "tiny" / "tables" / f"{t}.parquet")
        b = pd.read_parquet(cluster / "results" / "tiny" / "tables" / f"{t}.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=t)

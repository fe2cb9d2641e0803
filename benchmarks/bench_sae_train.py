"""SAE training throughput: stagediff's TopK trainer vs EleutherAI sparsify and SAELens TopK.

All three train on the same in-memory activations (one tensor, same batches in the same
order) with the same d_model, d_sae, k, batch size and optimiser (Adam, lr 1e-4), each
through its own forward/backward code. The timed step is what a training loop repeats:
forward, loss, backward, optimiser step. Runs alternate (stagediff, sparsify, SAELens, …)
so machine noise hits all of them alike; the median of ``--repeats`` runs is reported.

    pip install -r envs/requirements-bench.txt
    python benchmarks/bench_sae_train.py                  # CPU, the sizes below
    python benchmarks/bench_sae_train.py --device cuda    # GPU, plus the bf16 matmul roofline
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch  # noqa: E402

from stagediff.sae.topk import TopKSAE  # noqa: E402


def stagediff_step(d, d_sae, k, device, fused=True):
    sae = TopKSAE.random_init(d, d_sae, k, scale=1.0).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.9999), fused=fused)

    def step(x):
        loss = sae.normalised_mse(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sparsify_step(d, d_sae, k, device):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=d_sae, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.9999))

    def step(x):
        loss = sae(x).fvu
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def saelens_step(d, d_sae, k, device):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=k, device=str(device),
                                                aux_loss_coefficient=0.0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.9999))

    def step(x):
        out = sae.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return step


TRAINERS = {"stagediff": stagediff_step, "sparsify": sparsify_step, "saelens": saelens_step,
            # ablation: stagediff's sparse kernels with the others' (foreach) Adam
            "stagediff (foreach Adam)": lambda *a: stagediff_step(*a, fused=False)}


def timed(step, batches, device) -> float:
    step(batches[0])  # warm-up (allocator, lazy init)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for x in batches:
        step(x)
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="+", choices=list(TRAINERS), help="run these trainers only")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda":  # what stagediff.device sets for SAE math on CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
    d_sae = a.d_model * a.expansion
    torch.manual_seed(0)
    data = torch.randn(a.steps * a.batch_size, a.d_model, device=device)  # identical for all trainers
    batches = list(data.split(a.batch_size))
    steps = {name: make(a.d_model, d_sae, a.k, device) for name, make in TRAINERS.items()
             if not a.only or name in a.only}
    times = {name: [] for name in steps}
    for _ in range(a.repeats):
        for name, step in steps.items():
            times[name].append(timed(step, batches, device))
    tokens = a.steps * a.batch_size
    print(f"d_model {a.d_model}, d_sae {d_sae}, k {a.k}, batch {a.batch_size}, {a.steps} steps x {a.repeats} "
          f"repeats, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    tps = {n: tokens / statistics.median(t) for n, t in times.items()}
    for name, v in tps.items():
        print(f"  {name:24s} {v:10,.0f} tokens/s   (runs: {', '.join(f'{tokens / t:,.0f}' for t in times[name])})")
    if {"sparsify", "saelens"} <= set(tps):
        best = max(("sparsify", "saelens"), key=tps.get)
        print(f"ratio stagediff / {best} (the faster other) = {tps['stagediff'] / tps[best]:.2f}  (goal >= 1.2)")
        print(f"ratio stagediff / sparsify = {tps['stagediff'] / tps['sparsify']:.2f}, "
              f"stagediff / saelens = {tps['stagediff'] / tps['saelens']:.2f}")
    if device.type == "cuda" and "stagediff" in tps:
        # against a dense-equivalent SAE step (6·d·d_sae flop/token, the usual MFU convention) and
        # against what stagediff's step really multiplies densely (the encoder, 2·d·d_sae)
        peak = float(os.environ.get("PEAK_TF32_TFLOPS", "495")) * 1e12  # H100/H200 SXM dense TF32
        for name, per_token in (("6·d·d_sae", 6 * a.d_model * d_sae), ("2·d·d_sae", 2 * a.d_model * d_sae)):
            print(f"stagediff at {tps['stagediff'] * per_token / peak:.1%} of the TF32 peak "
                  f"({peak / 1e12:.0f} TFLOP/s, {name} flop/token)")


if __name__ == "__main__":
    main()

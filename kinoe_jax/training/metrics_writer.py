"""Where the numbers go: DIR/metrics.jsonl, Weights & Biases, the progress bar, the loss plot."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import gin
import jax
import jax.numpy as jnp
import numpy as np
import wandb
from matplotlib.figure import Figure
from tqdm import tqdm

from kinoe_jax.hardware.chips import CHIPS, chip_for_device_kind
from kinoe_jax.utils import atomic

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip, for MFU (the figures live in kinoe_jax/hardware/chips.py).
PEAK_FLOPS = {name: chip.peak_flops for name, chip in CHIPS.items()}


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on this device: the honest 'peak' of a CPU."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


@gin.configurable
def peak_flops_per_device(override: float | None = None) -> float:
    if override:
        return override
    chip = chip_for_device_kind(jax.devices()[0].device_kind)  # "TPU v5" is a v5p
    return chip.peak_flops if chip else measure_matmul_peak()


@gin.configurable
class MetricsWriter:
    """Only process 0 writes; every process may call it."""

    def __init__(self, workdir: str, total_steps: int, config_str: str = "", use_wandb: bool = True,
                 wandb_project: str = "kinoe_jax", wandb_mode: str | None = None, run_name: str | None = None,
                 initial_step: int = 0, progress: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.workdir = workdir
        self.wandb_run = None
        self.bar = None
        if not self.active:
            return
        if use_wandb:
            # Offline unless the user asks otherwise: no account or network needed.
            mode = wandb_mode or os.environ.get("WANDB_MODE", "offline")
            self.wandb_run = wandb.init(project=wandb_project, name=run_name or os.path.basename(workdir),
                                        dir=workdir, mode=mode, config={"gin": config_str}, resume="allow",
                                        id=_run_id(workdir))
        if progress:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=int(step))

    def progress(self, step: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def flatten(metrics: dict) -> dict:
    """Scalars stay; a per-layer or per-expert array becomes scalars W&B can plot:
    [n] -> key/i, [layers, n] -> key/i averaged over layers plus key/max (e.g. expert load)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = a.item()
            continue
        if a.ndim >= 2:
            out[f"{k}/max"] = float(a.max())
            a = a.reshape(-1, a.shape[-1]).mean(axis=0)
        for i, x in enumerate(a):
            out[f"{k}/{i}"] = float(x)
    return out


def _run_id(workdir: str) -> str:
    """A stable W&B id per workdir, so a resumed run continues the same W&B run."""
    path = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(path):
        return open(path).read().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic.write_text(path, run_id)
    return run_id


def _py(v):
    if isinstance(v, (np.generic, np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(workdir: str) -> str | None:
    """DIR/loss.png: training loss (and validation loss) against step, with the steps a spike
    rollback discarded in grey; beside it, when the run logged them, the update norms (all
    trained parameters in bold, each group thin) and the downstream scores
    (downstream/<dataset>/<metric>, their average in bold)."""
    rows = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    updates = sorted({k for r in rows for k in r if k == "update_norm" or
                      (k.startswith("stats/") and k.endswith("/update_norm"))})
    downstream = sorted({k for r in rows for k in r if k.startswith("downstream/")})
    panels = 1 + bool(updates) + bool(downstream)
    # A bare Figure draws without pyplot, so no global backend is chosen for the process.
    fig = Figure(figsize=(7 * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0][0]
    for n, discarded in _rolled_back(workdir).items():
        ax.plot(*zip(*discarded), color="grey", alpha=0.6, lw=1, label="rolled back" if n == 1 else None)
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    if updates:
        mid = axes[0][1]
        for key in updates:
            points = [(r["step"], r[key]) for r in rows if key in r and r[key] > 0]
            total = key == "update_norm"
            if points:
                mid.plot(*zip(*points), lw=2 if total else 1, alpha=1 if total else 0.7, color="black" if total else None,
                         label="all" if total else key.split("/")[1])
        mid.set_yscale("log")
        mid.set_xlabel("step")
        mid.set_ylabel("update norm")
        mid.set_title("update norms (the spike detector's early signal)")
        mid.grid(alpha=0.3)
        mid.legend(fontsize=7)
    if downstream:
        right = axes[0][-1]
        for key in downstream:
            points = [(r["step"], r[key]) for r in rows if key in r]
            average = key == "downstream/average"
            right.plot(*zip(*points), "o-", lw=2.5 if average else 1, ms=4 if average else 2, alpha=1 if average else 0.6,
                       label=key.removeprefix("downstream/"), color="black" if average else None)
        right.set_xlabel("step")
        right.set_ylabel("score")
        right.set_title("downstream evaluation")
        right.grid(alpha=0.3)
        right.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out = os.path.join(workdir, "loss.png")
    with atomic.atomic_file(out, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    return out


def _rolled_back(workdir: str) -> dict[int, list[tuple[int, float]]]:
    """The (step, loss) points each spike rollback discarded (DIR/rolled_back_metrics.jsonl)."""
    path = os.path.join(workdir, "rolled_back_metrics.jsonl")
    if not os.path.exists(path):
        return {}
    out: dict[int, list] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line) if line.strip() else {}
            if "loss" in r:
                out.setdefault(r.get("rollback", 0), []).append((r["step"], r["loss"]))
    return out

"""Optimiser and learning-rate schedules (optax)."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import optax

from kinoe_jax.config.decay import WSD_DECAY_FRACTION, decay_steps


@gin.configurable
def cosine_schedule(total_steps: int, peak_lr: float = 3e-4, warmup_steps: int = 100,
                    final_lr: float = 1e-6):
    """Linear warmup, then cosine to a floor (the team's 1.5e-4 -> 1e-6 run)."""
    warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    decay = optax.cosine_decay_schedule(peak_lr, max(total_steps - warmup_steps, 1), alpha=final_lr / peak_lr)
    return optax.join_schedules([warmup, decay], [warmup_steps])


@gin.configurable
def wsd_schedule(total_steps: int, peak_lr: float = 3e-4, warmup_steps: int = 100,
                 decay_fraction: float = WSD_DECAY_FRACTION, final_lr: float = 1e-6, decay: str = "exponential"):
    """Warmup-Stable-Decay (MiniCPM): constant after warmup, then a short decay at the end.

    The stable phase can be extended without knowing the final length, and the decay is where
    the SFT mixture enters (kinoe_jax.data.phases aligns with kinoe_jax.config.decay).
    """
    if decay not in ("exponential", "linear"):
        raise ValueError(f"wsd_schedule: decay must be 'exponential' or 'linear', got {decay!r}")
    n_decay = decay_steps(total_steps, decay_fraction)
    stable_end = max(total_steps - n_decay, warmup_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * step / max(warmup_steps, 1)
        frac = jnp.clip((step - stable_end) / n_decay, 0.0, 1.0)
        if decay == "exponential":
            decayed = peak_lr * (final_lr / peak_lr) ** frac
        else:
            decayed = peak_lr + (final_lr - peak_lr) * frac
        return jnp.where(step < warmup_steps, warm, jnp.where(step < stable_end, peak_lr, decayed))

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


@gin.configurable
def decay_mask(params, decay_norms: bool = False, decay_embeddings: bool = False):
    """True where weight decay applies: matrices, but not norm scales or embeddings by default."""

    def keep(path, _):
        names = _path_names(path)
        if any("norm" in n for n in names):
            return decay_norms
        if "embed" in names:
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(keep, params)


@gin.configurable
def make_optimizer(total_steps: int, schedule=cosine_schedule, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.1, clip_norm: float = 1.0):
    """AdamW with a decay mask and global-norm clipping. Returns (tx, schedule_fn)."""
    lr = schedule(total_steps=total_steps)
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), lr

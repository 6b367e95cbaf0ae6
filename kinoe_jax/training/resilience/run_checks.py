"""A bad run configuration fails in seconds, before the expensive part, naming the culprit."""

from __future__ import annotations

import re

from kinoe_jax.utils.errors import ConfigError

# Parameter names that would hold a secret, and values that look like one.
_SECRET_WORDS = {"apikey", "token", "secret", "password", "passwd", "webhook", "credential", "credentials"}
_SECRET_VALUE = re.compile(r"(hooks\.slack\.com/|discord(app)?\.com/api/webhooks/|\b[0-9a-f]{40}\b|"
                           r"\bxox[abprs]-|\bsk-[A-Za-z0-9]{20,})")
SECRET_HELP = ("secrets come only from the environment (WANDB_API_KEY for W&B, KINOE_ALERT_WEBHOOK "
               "for a webhook), never from gin files or bindings")


def find_secrets(config_str: str) -> list[str]:
    """Lines of a gin config that bind something secret-looking."""
    found = []
    for line in config_str.splitlines():
        if "=" not in line or line.lstrip().startswith("#"):
            continue
        name, value = (part.strip() for part in line.split("=", 1))
        param = name.rsplit(".", 1)[-1].lower().replace("api_key", "apikey")
        # `..._env` names an environment variable, which is where secrets belong.
        secret_name = not param.endswith("_env") and bool(_SECRET_WORDS & set(param.split("_")))
        if value and value not in ("None", "''", '""') and (secret_name or _SECRET_VALUE.search(value)):
            found.append(name)
    return found


def validate_run(model_config, data, checkpointing, *, total_steps: int, log_every: int, eval_every: int,
                 downstream_eval_every: int = 0, config_str: str = "") -> None:
    """Every problem at once, each named by its gin binding."""
    p = []
    if total_steps < 1:
        p.append(f"train.total_steps = {total_steps} must be >= 1")
    if log_every < 1:
        p.append(f"train.log_every = {log_every} must be >= 1")
    if eval_every < 0:
        p.append(f"train.eval_every = {eval_every} must be >= 0 (0 turns evaluation off)")
    if downstream_eval_every < 0:
        p.append(f"train.downstream_eval_every = {downstream_eval_every} must be >= 0 (0 turns it off)")
    if data.seq_len < 2:
        p.append(f"DataConfig.seq_len = {data.seq_len} must be >= 2")
    if data.seq_len > model_config.max_seq_len:
        p.append(f"DataConfig.seq_len = {data.seq_len} exceeds ModelConfig.max_seq_len = {model_config.max_seq_len}")
    if data.global_batch < 1 or data.grad_accum < 1:
        p.append(f"DataConfig.global_batch = {data.global_batch} and DataConfig.grad_accum = {data.grad_accum} "
                 "must be >= 1")
    elif data.global_batch % data.grad_accum:
        p.append(f"DataConfig.global_batch = {data.global_batch} is not divisible by DataConfig.grad_accum = "
                 f"{data.grad_accum}")
    if eval_every and getattr(data, "eval_batches", 1) < 1:
        p.append(f"DataConfig.eval_batches = {data.eval_batches} must be >= 1 when train.eval_every > 0")
    if checkpointing.save_every < 1:
        p.append(f"CheckpointConfig.save_every = {checkpointing.save_every} must be >= 1")
    if checkpointing.keep is not None and checkpointing.keep < 1:
        p.append(f"CheckpointConfig.keep = {checkpointing.keep} must be >= 1 (or None to keep all)")
    if getattr(checkpointing, "keep_period", None) is not None and checkpointing.keep_period < 1:
        p.append(f"CheckpointConfig.keep_period = {checkpointing.keep_period} must be >= 1 (or None)")
    for name in find_secrets(config_str):
        p.append(f"{name} is bound in the gin config: {SECRET_HELP}")
    if p:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(p))

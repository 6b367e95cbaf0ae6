"""Which parameters the optimizer updates: all of them, or only the LoRA adapters.

The train state always holds the whole parameter tree (so checkpoints, export and generation see
one model), but gradients, their accumulation buffers and the optimizer state exist only for the
trainable part. A frozen base therefore costs its weights and nothing else.
"""

from __future__ import annotations

from typing import Callable

from flax import traverse_util

from kinoe_jax.models import lora

Predicate = Callable[[tuple[str, ...]], bool]


def everything(path: tuple[str, ...]) -> bool:  # noqa: ARG001 (a predicate over parameter paths)
    return True


def for_model(cfg) -> Predicate:
    """Adapters only when the model carries LoRA, otherwise every parameter."""
    if getattr(cfg, "lora", None) is None:
        return everything
    return lora.is_adapter


def split(tree, trainable: Predicate):
    """(trainable, frozen) nested dicts of a params-shaped tree (params, specs, gradients...)."""
    if trainable is everything:
        return tree, {}
    flat = traverse_util.flatten_dict(tree)
    keep = {k: v for k, v in flat.items() if trainable(tuple(str(p) for p in k))}
    rest = {k: v for k, v in flat.items() if k not in keep}
    if not keep:
        raise ValueError("no trainable parameters: the model has no LoRA adapters to train")
    return traverse_util.unflatten_dict(keep), traverse_util.unflatten_dict(rest)


def merge(trainable_part, frozen_part):
    """The inverse of split."""
    if not frozen_part:
        return trainable_part
    flat = traverse_util.flatten_dict(frozen_part)
    flat.update(traverse_util.flatten_dict(trainable_part))
    return traverse_util.unflatten_dict(flat)

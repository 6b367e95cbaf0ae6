"""Low-precision training matmuls: `ModelConfig.matmul_dtype` = default | fp8 | int8.

What runs in low precision: the attention projections (q, k, v, o), the MLP (gate, up, down) and
the experts of the `ragged` MoE implementation. The LM head, the router, attention itself and
LoRA adapters stay in `ModelConfig.dtype`: the head and the router decide every token's loss and
expert, and nothing was measured that says they could change.

The recipe (both modes; qwix's quantized-training dot_general does the work):
  fp8   forward operands e4m3 (precision where values live), incoming gradients e5m2 (range,
        for gradients that span many decades), as NVIDIA's and torchtitan's recipes do;
  int8  every operand symmetric int8, as MaxText's int8 training (AQT) does.
Scales are absmax of the current tensor, one per row or column outside the contraction
("current", channelwise scaling). No amax history means no extra training state: the master
weights stay fp32, and checkpoints and HF exports never see a quantized value.

Modes by chip come from kinoe_jax.hardware.chips (fp8 on H100/H200, int8 on TPU v5e/v5p/v6e).
A mode the mesh's chip lacks is refused when the model is first traced, before any compile; the
CPU runs both emulated, for tests only, and logs that it does.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from kinoe_jax.hardware import chips
from kinoe_jax.utils.errors import ConfigError

log = logging.getLogger(__name__)

from kinoe_jax.models.config import MATMUL_DTYPES as MODES
_QTYPES = {"fp8": (jnp.float8_e4m3fn, jnp.float8_e5m2), "int8": (jnp.int8, jnp.int8)}
_MATMUL = (((1,), (0,)), ((), ()))  # [rows, in] @ [in, out]


def check_mode(mode: str) -> None:
    """Refuse, in one line, a mode that is unknown or that the mesh's chip does not offer."""
    if mode not in MODES:
        raise ConfigError(f"ModelConfig.matmul_dtype {mode!r} is not one of {MODES}")
    if mode == "default":
        return
    kind, platform = _mesh_device()
    if platform == "cpu":
        _warn_emulated(mode)
        return
    chip = chips.chip_for_device_kind(kind)
    offered = chips.low_precision_modes(chip) if chip is not None else ()
    if mode not in offered:
        raise ConfigError(f"ModelConfig.matmul_dtype {mode!r} is not supported on {kind}: it supports "
                          f"{['default', *offered]} ({where_offered()})")


def where_offered() -> str:
    """'fp8 on h100, h200; int8 on ...': the chips each mode runs on."""
    return "; ".join(f"{m} on " + ", ".join(n for n, c in chips.CHIPS.items() if m in chips.low_precision_modes(c))
                     for m in MODES[1:])


def matmul(x, w, mode: str):
    """x [rows, in] @ w [in, out] in `mode`; both already in the compute dtype."""
    if mode == "default":
        return x @ w
    return _qt_dot(x, w, _MATMUL, mode).astype(x.dtype)


def ragged_dot(rows, w, group_sizes, mode: str):
    """jax.lax.ragged_dot (rows [R, in] sorted by group, w [G, in, out]) in `mode`."""
    if mode == "default":
        return jax.lax.ragged_dot(rows, w, group_sizes)
    from qwix._src.core import ragged_dot_qt  # noqa: PLC0415 (qwix's quantized-training kernel)

    fwd, bwd = _QTYPES[mode]
    config = ragged_dot_qt.RaggedDotQtConfig(lhs_qtype=fwd, rhs_qtype=fwd, dlhs_grad_qtype=bwd,
                                             drhs_grad_qtype=bwd)
    return ragged_dot_qt.ragged_dot_qt(rows, w, group_sizes, config).astype(rows.dtype)


def _qt_dot(lhs, rhs, dimension_numbers, mode):
    # qwix 0.1.8 publishes quantized training only as a Linen/NNX interceptor (quantize_model);
    # its functional dot_general underneath is what one projection needs. The version is pinned.
    from qwix._src.core import dot_general_qt  # noqa: PLC0415

    fwd, bwd = _QTYPES[mode]
    config = dot_general_qt.DotGeneralQtConfig(lhs_qtype=fwd, rhs_qtype=fwd, dlhs_grad_qtype=bwd,
                                               drhs_grad_qtype=bwd)
    return dot_general_qt.dot_general_qt(lhs, rhs, dimension_numbers, config)


def _mesh_device() -> tuple[str, str]:
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if mesh is not None and not mesh.empty else None
    if device is not None:
        return device.device_kind, device.platform
    d = jax.devices()[0]
    return d.device_kind, d.platform


@functools.cache
def _warn_emulated(mode: str) -> None:
    log.warning("ModelConfig.matmul_dtype %r on the CPU is emulated, for tests only: no speed-up", mode)

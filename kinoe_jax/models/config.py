"""The one description of a model's shape. Presets live in gin_configs/models/."""

from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import jax.numpy as jnp

from kinoe_jax.models import lora as lora_lib
from kinoe_jax.models.lora import LoraConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload", "offload_dots_no_batch")
MOE_IMPLS = ("auto", "blocks", "ragged", "gmm", "dense")
ATTENTION_IMPLS = ("auto", "blocked", "splash", "cudnn")
MATMUL_DTYPES = ("default", "fp8", "int8")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # defaults to hidden_size // num_heads
    rope_theta: float = 10000.0
    # The team's real model rotated only 25% of each head; HF Mistral rotates all of it.
    rotary_fraction: float = 1.0
    sliding_window: Optional[int] = None  # None: full causal attention
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Causal attention in query chunks of this many tokens, each against only the keys it can
    # see (skips the masked upper triangle: ~2.5x faster attention on CPU). 0 = one block.
    attention_chunk: int = 128
    # Training attention kernel: auto (splash on TPU, cudnn on GPU, blocked on CPU) | blocked |
    # splash | cudnn (kinoe_jax/models/attention/, docs/chips.md).
    attention_impl: str = "auto"
    # Splash attention's query and key/value tiles (capped at the sequence; multiples of 128).
    attention_block_q: int = 512
    attention_block_kv: int = 512
    # Splash's backward (dq, dkv) tiles; 0: the forward's.
    attention_block_q_dkv: int = 0
    attention_block_kv_dkv: int = 0
    # Parameters stay fp32; activations and matmuls run in this dtype.
    dtype: str = "float32"
    # Projection, MLP and expert matmuls: default (in `dtype`) | fp8 (H100/H200) | int8 (TPU
    # v5e/v5p/v6e); kinoe_jax/models/quant.py says which matmuls and how they are scaled.
    matmul_dtype: str = "default"
    # Rematerialisation of each layer: none | full (keep nothing) | dots | dots_no_batch (keep the
    # matmul outputs) | offload (the layer input and q/k/v/o projections kept in host memory,
    # the rest recomputed) | offload_dots_no_batch (those offloaded, other matmuls kept).
    remat_policy: str = "none"
    # Training losses take log p(target) from the LM head this many positions at a time, never
    # holding all the logits (kinoe_jax/models/lm_head.py); 0: materialise them (the reference).
    lm_head_chunk: int = 512
    scan_layers: bool = True
    # Mixture of experts (0 experts: every layer dense).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    # Which layers are MoE when num_experts > 0: every `moe_layer_period`-th layer, starting at
    # `moe_layer_offset` (period 1 = all layers, as Mixtral).
    moe_layer_period: int = 1
    moe_layer_offset: int = 0
    # Router losses, already scaled when added to the objective: Switch load balancing
    # (1.0 at perfect balance) and the ST-MoE router z-loss.
    moe_lb_loss_coef: float = 0.01
    moe_z_loss_coef: float = 1e-3
    # 0: dropless. > 0: each expert takes at most factor * fair share rows, the rest dropped.
    moe_capacity_factor: float = 0.0
    # Dropless grouped matmul (docs/moe.md): auto (blocks on CPU, ragged on GPU, gmm on TPU) |
    # blocks | ragged | gmm | dense (every expert on every token: the reference).
    moe_impl: str = "auto"
    moe_block_size: int = 64  # rows per block of the "blocks" implementation
    # Low-rank adapters on the projections (kinoe_jax/models/lora.py); None: no adapters.
    lora: Optional[LoraConfig] = None

    def __post_init__(self):
        if isinstance(self.lora, dict):  # a checkpoint's model_config JSON holds it as a dict
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        problems = []
        if self.hidden_size % self.num_heads and self.head_dim is None:
            problems.append(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            problems.append(f"rotary_fraction {self.rotary_fraction} must be in (0, 1]")
        rot = self.rotary_dim
        if rot % 2:
            problems.append(f"rotary dims per head ({rot}) must be even")
        if self.dtype not in _DTYPES:
            problems.append(f"dtype {self.dtype!r} not one of {sorted(_DTYPES)}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            problems.append(f"matmul_dtype {self.matmul_dtype!r} not one of {MATMUL_DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy {self.remat_policy!r} not one of {REMAT_POLICIES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append(f"sliding_window {self.sliding_window} must be positive or None")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_experts]")
        if self.num_experts and self.num_layers % self.moe_layer_period:
            problems.append(f"num_layers {self.num_layers} must be a multiple of moe_layer_period {self.moe_layer_period}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl {self.attention_impl!r} not one of {ATTENTION_IMPLS}")
        for name in ("attention_block_q", "attention_block_kv"):
            if getattr(self, name) < 128 or getattr(self, name) % 128:
                problems.append(f"{name} {getattr(self, name)} must be a positive multiple of 128")
        for name in ("attention_block_q_dkv", "attention_block_kv_dkv"):
            if getattr(self, name) < 0 or getattr(self, name) % 128:
                problems.append(f"{name} {getattr(self, name)} must be 0 (the forward's) or a positive multiple of 128")
        if self.lm_head_chunk < 0:
            problems.append(f"lm_head_chunk {self.lm_head_chunk} must be >= 0 (0: all logits at once)")
        if self.moe_impl not in MOE_IMPLS:
            problems.append(f"moe_impl {self.moe_impl!r} not one of {MOE_IMPLS}")
        if self.moe_capacity_factor < 0 or self.moe_block_size < 1:
            problems.append(f"moe_capacity_factor {self.moe_capacity_factor} must be >= 0 and "
                            f"moe_block_size {self.moe_block_size} >= 1")
        if self.lora is not None:
            problems += lora_lib.model_problems(self)
        if problems:
            raise ValueError("ModelConfig: " + "; ".join(problems))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(round(self.dim_per_head * self.rotary_fraction))

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts > 0 and index % self.moe_layer_period == self.moe_layer_offset

    def num_params(self, include_embeddings: bool = True, active_only: bool = False) -> int:
        """Parameter count from the shapes (active_only counts top-k experts for FLOPs)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.dim_per_head
        attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        dense_mlp = 3 * e * f
        total = 0
        for i in range(self.num_layers):
            total += attn + 2 * e
            if self.is_moe_layer(i):
                n = self.num_experts_per_tok if active_only else self.num_experts
                total += n * dense_mlp + e * self.num_experts
            else:
                total += dense_mlp
        total += e  # final norm
        if include_embeddings:
            total += self.vocab_size * e * (1 if self.tie_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """6N + 12·L·H·Q·T: matmul FLOPs of one training token (forward + backward).

        N counts the active non-embedding parameters plus the LM head, whose matmul is real work.
        """
        n = self.num_params(include_embeddings=False, active_only=True) + self.vocab_size * self.hidden_size
        # The full T, as the published MFU figures count it, even under a sliding window.
        return 6.0 * n + 12.0 * self.num_layers * self.num_heads * self.dim_per_head * seq_len

"""A small preset compiled for a 2-slice v5p target and a 2-node H100 target: the networks each
layout's collectives cross, read from the compiled program."""

import gin
import pytest

from kinoe_jax.hardware import chips
from kinoe_jax.models import ModelConfig
from kinoe_jax.parallel.mesh import make_mesh
from kinoe_jax.planning.fit import fit_report

TINY = {"vocab_size": 4096, "hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 128, "max_seq_len": 256, "dtype": "bfloat16", "remat_policy": "full"}
HSDP = {"data": -1, "fsdp": "inner", "tensor": 1, "expert": 1}
FSDP = {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}


def _report(target: str, layout: dict):
    tgt = chips.target(target)
    gin.clear_config()
    mesh = make_mesh(devices=tgt.devices(), **layout)
    return fit_report(ModelConfig(**TINY), mesh, seq_len=256, global_batch=2 * mesh.size,
                      device_memory_gb=tgt.chip.memory_gb, peak_tflops=tgt.chip.peak_tflops,
                      hbm_gbps=tgt.chip.hbm_gbps, target=tgt.describe(), chip=tgt.chip)


# What crosses the slow network beyond HSDP's one gradient reduction, in bytes per device. On
# TPU libtpu reduces the embedding's gradient whole across the slices (the gather's transpose is
# not split over fsdp first): a vocab x hidden table in bf16. On GPU this preset moves 1.33x its
# ideal (reductions over all 16 devices of a few small tensors); kinoe_9b on h100-64 moves 1.03x
# and mistral_7b on 2xv5p-128 1.04x (BENCHMARKS.md): the excess does not grow with the model.
EMBEDDING_BF16 = TINY["vocab_size"] * TINY["hidden_size"] * 2
EXCESS = {"2xv5p-16": EMBEDDING_BF16, "h100-16": 0.25 * 410880}


@pytest.mark.slow
@pytest.mark.parametrize("target, slow_net", [("2xv5p-16", "DCN"), ("h100-16", "InfiniBand")])
def test_hsdp_keeps_the_layers_off_the_slow_network(target, slow_net):
    hsdp, fsdp = _report(target, HSDP), _report(target, FSDP)
    assert hsdp.mesh["data"] == 2 and fsdp.mesh["fsdp"] == 16
    assert hsdp.axis_tiers["data"] == "outer" and hsdp.axis_tiers["fsdp"] == "inner"
    slow_hsdp, slow_fsdp = hsdp.collectives_by_tier[slow_net], fsdp.collectives_by_tier[slow_net]
    # HSDP: the gradient reduction crosses the slow network, and little else.
    limit = 1.1 * hsdp.ideal_bytes_by_tier[slow_net] + EXCESS[target]
    assert slow_hsdp <= limit, (slow_hsdp, hsdp.ideal_bytes_by_tier)
    assert hsdp.estimated_step_s >= hsdp.roofline_s
    assert fsdp.axis_tiers["fsdp"] == "outer" and slow_fsdp > 0
    if slow_net == "InfiniBand":
        # A ring over all 16 GPUs crosses InfiniBand with every layer's gathers. libtpu instead
        # splits a cross-slice collective into an in-slice one and a DCN transfer of one shard
        # per slice, so on TPU flat FSDP's DCN bytes stay of the order of HSDP's.
        assert slow_fsdp > 2 * slow_hsdp
        assert fsdp.estimated_step_s > hsdp.estimated_step_s

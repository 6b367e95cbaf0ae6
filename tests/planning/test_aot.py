"""The ahead-of-time fit check compiles the real step for a mesh without allocating the model."""

import json
import os

import gin
import jax
import pytest

from paths import REPO

TINY = ["ModelConfig.vocab_size = 4000", "ModelConfig.hidden_size = 64", "ModelConfig.intermediate_size = 128",
        "ModelConfig.num_layers = 4", "ModelConfig.num_heads = 4", "ModelConfig.num_kv_heads = 2",
        "ModelConfig.max_seq_len = 64"]


def _preset(name, bindings=()):
    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.models import ModelConfig

    gin.clear_config()
    load_gin([os.path.join(REPO, "gin_configs", "models", f"{name}.gin")], list(bindings))
    return ModelConfig()


def _mesh(**axes):
    from kinoe_jax.parallel.mesh import make_mesh

    return make_mesh(**axes)


@pytest.mark.slow
@pytest.mark.parametrize("preset, fits", [("mistral_7b", True), ("kinoe_9b", True), ("mixtral_8x7b", False)])
def test_presets_compile_on_8_devices_without_allocating(preset, fits):
    import psutil

    from kinoe_jax.planning.fit import GIB, fit_report

    cfg = _preset(preset)
    rss = psutil.Process().memory_info().rss
    # Full depth (the layers are scanned, so depth costs no compile time); a short sequence keeps
    # the CPU compile quick. BENCHMARKS.md has the real sequence lengths.
    r = fit_report(cfg, _mesh(data=1, fsdp=8), seq_len=512, global_batch=8, device_memory_gb=80,
                   peak_tflops=989, hbm_gbps=3352, mfu=0.4)
    grown = psutil.Process().memory_info().rss - rss
    full_params = cfg.num_params() * 4
    assert full_params > 7e9 * 4
    assert grown < 4 * GIB, f"the fit check allocated {grown / GIB:.1f} GiB"
    # FSDP over 8: an eighth of the fp32 parameters and of the two Adam moments per device.
    assert abs(r.params_bytes - full_params / 8) / (full_params / 8) < 0.01
    assert abs(r.opt_state_bytes - 2 * r.params_bytes) / r.params_bytes < 0.01
    assert abs((r.params_bytes + r.opt_state_bytes) / r.min_state_bytes - 1) < 0.01
    assert r.temp_bytes > 0 and r.total_bytes > r.params_bytes + r.opt_state_bytes
    assert r.tokens_per_sec() > 0
    # Mixtral's 47B parameters and Adam moments alone take 65 GiB per device on 8 devices.
    assert r.fits is fits, f"{preset}: {r.total_bytes / GIB:.1f} GiB per device"


@pytest.mark.slow
def test_hlo_counts_every_loop_iteration():
    """XLA's cost analysis counts a loop body once; the HLO count multiplies it by its trips, so
    the scanned program counts what the unrolled one does, and matches XLA there."""
    import dataclasses

    from kinoe_jax.planning import hlo_stats
    from kinoe_jax.planning.fit import compile_train_step
    from kinoe_jax.models import ModelConfig

    # A small vocabulary: the scanned layers, not the LM head, must carry most of the FLOPs.
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                      num_kv_heads=2, max_seq_len=64, remat_policy="dots_no_batch")
    mesh = _mesh(data=1, fsdp=8)
    scanned, _ = compile_train_step(cfg, mesh, 64, 8, 1, False)
    unrolled, _ = compile_train_step(dataclasses.replace(cfg, scan_layers=False), mesh, 64, 8, 1, False)
    s, u = (hlo_stats.analyze(c.as_text(), 8) for c in (scanned, unrolled))
    assert s.loops >= 2 and s.loops_without_trip_count == 0
    assert s.matmul_flops == pytest.approx(u.matmul_flops, rel=1e-6)
    xla = unrolled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert 0.85 < u.matmul_flops / xla["flops"] <= 1.0  # XLA adds the elementwise work
    assert scanned.cost_analysis()["flops"] < 0.8 * u.matmul_flops  # why the HLO count exists
    formula = cfg.flops_per_token(64) * 8 * 64 / 8
    assert 0.8 < s.matmul_flops / formula < 1.4


def test_loop_trip_counts_follow_start_step_and_limit():
    """A hand-written loop: i from 1 while i < 9 in steps of 2 runs 4 times (XLA unrolls its
    windowed einsums by two like this); the dot inside counts 4 times."""
    from kinoe_jax.planning import hlo_stats

    hlo = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16] get-tuple-element(%p), index=1
  %w = f32[16,16] constant({...})
  %y = f32[8,16] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  ROOT %t = (s32[], f32[8,16]) tuple(%next, %y)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %nine = s32[] constant(9)
  ROOT %lt = pred[] compare(%i, %nine), direction=LT
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16] parameter(0)
  %one = s32[] constant(1)
  %init = (s32[], f32[8,16]) tuple(%one, %x)
  %loop = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
  %ag = f32[64,16] all-gather(%x), replica_groups=[1,8]<=[8], dimensions={0}
  %a = f32[4,8,16,32] constant({...})
  %b = f32[4,8,32,24] constant({...})
  %bmm = f32[4,8,16,24] convolution(%a, %b), window={size=4x8 stride=3x7 lhs_dilate=4x8}, dim_labels=01bf_01io->01bf
  ROOT %out = f32[8,16] get-tuple-element(%loop), index=1
}
"""
    stats = hlo_stats.analyze(hlo, 8)
    assert stats.loops == 1 and stats.loops_without_trip_count == 0
    # The loop's dot 4 times, and a batched matmul the TPU compiler writes as a base-dilated
    # convolution: each output meets one real element per window, 32 multiply-adds.
    assert stats.matmul_flops == 4 * 2 * 8 * 16 * 16 + 2 * (4 * 8 * 16 * 24) * 32
    assert stats.collective_bytes == {"all-gather": 64 * 16 * 4 * 7 / 8}


def test_cli_prints_figures_and_flags_a_misfit(tmp_path, capsys):
    from kinoe_jax.aot import main

    assert jax.device_count() == 8  # conftest's simulated devices: main uses them as they are
    args = ["--gin_file=gin_configs/mesh/fsdp.gin", "--num_devices=8", "--seq_len=64", "--global_batch=8",
            "--accelerator=h100"] + [f"--gin_bindings={b}" for b in TINY]
    out_json = tmp_path / "fit.json"
    assert main(args + [f"--json_out={out_json}"]) == 0
    text = capsys.readouterr().out
    assert "FITS:" in text and "parameters" in text and "tokens/s" in text and "6N+12LHQT" in text
    figures = json.loads(out_json.read_text())
    assert figures["fits"] is True and figures["num_devices"] == 8 and figures["mesh"]["fsdp"] == 8

    gin.clear_config()
    assert main(args + ["--device_memory_gb=0.001"]) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "short by" in text

    # ZeRO-1 on a data-parallel mesh: parameters whole on every device, Adam moments split 8 ways.
    gin.clear_config()
    zero1 = tmp_path / "zero1.json"
    assert main(["--gin_file=gin_configs/mesh/zero1.gin", "--num_devices=8", "--seq_len=64", "--global_batch=8",
                 f"--json_out={zero1}"] + [f"--gin_bindings={b}" for b in TINY]) == 0
    z = json.loads(zero1.read_text())
    assert z["zero1"] and z["mesh"]["data"] == 8
    assert z["opt_state_bytes"] < 0.3 * z["params_bytes"]


def test_targets_name_their_slice_or_the_problem():
    from kinoe_jax.hardware import chips
    from kinoe_jax.aot import main

    t = chips.target("v5p-16")
    assert (t.platform, t.num_devices, t.topology, t.chip_config) == ("tpu", 8, "v5p:2x2x2", "megacore")
    assert chips.target("v5p-8").num_devices == 4  # v5p counts TensorCores, two per chip
    assert (chips.target("v6e-8").topology, chips.target("h100-16").topology) == ("v6e:2x4", "1x2x8")
    assert chips.chip_for_device_kind("TPU v5 lite").name == "v5e"
    assert chips.chip_for_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    with pytest.raises(SystemExit, match="unknown target 'v9x-8'"):
        main(["--gin_file=gin_configs/models/tiny_ja.gin", "--target=v9x-8"])
    with pytest.raises(SystemExit, match="v5p slices come in"):
        main(["--gin_file=gin_configs/models/tiny_ja.gin", "--target=v5p-12"])
    # Block sizes that cannot tile the sequence are named before anything compiles.
    with pytest.raises(SystemExit, match="attention_block_q = 384 does not tile sequence length 512"):
        main(["--gin_file=gin_configs/models/tiny_ja.gin", "--target=v5p-8", "--seq_len=512",
              "--gin_bindings=ModelConfig.attention_block_q = 384"])


@pytest.mark.slow
@pytest.mark.parametrize("target, kernel", [("v5p-8", "splash_mha_fwd"), ("h100-8", "__cudnn$fmha")])
def test_cli_on_the_chip_compiler(tmp_path, capsys, target, kernel):
    """The tiny model compiled by libtpu / the CUDA compiler: memory, the kernels priced, FSDP
    collectives against their ideal, the roofline and the planner line."""
    from kinoe_jax.aot import main

    out = tmp_path / "fit.json"
    args = ["--gin_file=gin_configs/mesh/fsdp.gin", f"--target={target}", "--seq_len=256", "--global_batch=8",
            "--train_tokens=1e9", f"--json_out={out}"] + [f"--gin_bindings={b}" for b in TINY] + [
        "--gin_bindings=ModelConfig.max_seq_len = 256", "--gin_bindings=ModelConfig.head_dim = 128",
        "--gin_bindings=ModelConfig.dtype = 'bfloat16'", "--gin_bindings=ModelConfig.remat_policy = 'dots_no_batch'"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "FITS:" in text and "plan: 1e+09 tokens" in text and "roofline step time" in text
    r = json.loads(out.read_text())
    assert r["platform"] == ("tpu" if target.startswith("v5p") else "gpu")
    assert [k for k in r["kernels"] if k["name"].startswith(kernel)], r["kernels"]
    calls = {("bwd" if "backward" in k["name"].lower() or "dkv" in k["name"] else "fwd"): k["calls"]
             for k in r["kernels"]}
    # One backward per layer; the forward once with splash (its residuals are kept by name),
    # twice with cuDNN (the dots policy reruns it inside the backward).
    assert calls == {"fwd": 4 if target.startswith("v5p") else 8, "bwd": 4}
    assert all(k["flops"] > 0 for k in r["kernels"]) and r["unpriced_kernels"] == []
    assert 0.9 < r["flops_compiled"] / r["flops_formula"] < 1.6
    # At this size XLA keeps the gathered weights for the backward: below the ideal's 2 gathers.
    total = sum(r["collective_bytes"].values())
    assert 0.5 < total / r["fsdp_ideal_bytes"] < 1.5
    assert 0 < r["estimated_mfu"] < 1 and r["tokens_per_sec_per_device"] > 0


def test_lora_and_dpo_state_on_the_fsdp_mesh():
    """LoRA keeps optimizer moments for the adapters only; full DPO holds a second (frozen)
    parameter tree, LoRA DPO none: what the AOT report prints, from the compiled step."""
    import dataclasses

    from kinoe_jax.planning.fit import fit_report
    from kinoe_jax.models import ModelConfig
    from kinoe_jax.models.lora import LoraConfig, num_adapter_params
    from kinoe_jax.training.objectives import DPO

    cfg = ModelConfig(vocab_size=4000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64)
    lora = dataclasses.replace(cfg, lora=LoraConfig(rank=8, alpha=16.0))
    mesh = _mesh(data=1, fsdp=8)
    reports = {(name, obj): fit_report(c, mesh, seq_len=64, global_batch=8, objective=DPO() if obj else None)
               for name, c in (("full", cfg), ("lora", lora)) for obj in (False, True)}
    full, adapters = reports[("full", False)], reports[("lora", False)]
    # Adam's two fp32 moments per trained parameter (and optax's step counters).
    assert abs(full.opt_state_bytes - 2 * 4 * cfg.num_params() / 8) / full.opt_state_bytes < 0.01
    assert abs(adapters.opt_state_bytes - 2 * 4 * num_adapter_params(lora) / 8) < 1024  # sharded 8 ways
    assert reports[("full", True)].frozen_bytes == full.params_bytes
    assert reports[("lora", True)].frozen_bytes == 0
    assert reports[("lora", True)].total_bytes < reports[("full", True)].total_bytes

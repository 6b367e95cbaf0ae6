"""The ahead-of-time fit check compiles the real step for a mesh without allocating the model."""

import json
import os

import gin
import jax
import pytest

from conftest import REPO

TINY = ["ModelConfig.vocab_size = 4000", "ModelConfig.hidden_size = 64", "ModelConfig.intermediate_size = 128",
        "ModelConfig.num_layers = 4", "ModelConfig.num_heads = 4", "ModelConfig.num_kv_heads = 2",
        "ModelConfig.max_seq_len = 64"]


def _preset(name, bindings=()):
    from kinoe_jax.config_io import load_gin
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

    from kinoe_jax.aot import GIB, fit_report

    cfg = _preset(preset)
    rss = psutil.Process().memory_info().rss
    # Full depth (the layers are scanned, so depth costs no compile time); a short sequence keeps
    # the CPU compile quick. BENCHMARKS.md has the real sequence lengths.
    r = fit_report(cfg, _mesh(data=1, fsdp=8), seq_len=512, global_batch=8, count=False,
                   device_memory_gb=80, peak_tflops=989, mfu=0.4)
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
def test_flop_count_matches_a_fully_unrolled_compile():
    """XLA counts a loop body once; the shallow-compile extrapolation must recover the full count."""
    import dataclasses

    from kinoe_jax.aot import _flops, compile_train_step, count_flops
    from kinoe_jax.models import ModelConfig

    cfg = ModelConfig(vocab_size=4000, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                      num_kv_heads=2, max_seq_len=64)
    mesh = _mesh(data=1, fsdp=8)
    counted = count_flops(cfg, mesh, 64, 8, zero1=False)
    unrolled, _ = compile_train_step(dataclasses.replace(cfg, scan_layers=False), mesh, 64, 8, 1, False)
    assert counted == pytest.approx(_flops(unrolled) * mesh.size, rel=1e-4)
    scanned, _ = compile_train_step(cfg, mesh, 64, 8, 1, False)
    assert _flops(scanned) * mesh.size < 0.9 * counted  # why the extrapolation exists
    formula = cfg.flops_per_token(64) * 8 * 64
    assert 0.7 < counted / formula < 1.5


def test_cli_prints_figures_and_flags_a_misfit(tmp_path, capsys):
    from kinoe_jax.aot import main

    assert jax.device_count() == 8  # conftest's simulated devices: main uses them as they are
    args = ["--gin_file=gin_configs/mesh/fsdp.gin", "--num_devices=8", "--seq_len=64", "--global_batch=8",
            "--skip_flop_count", "--accelerator=h100"] + [f"--gin_bindings={b}" for b in TINY]
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
                 "--skip_flop_count", f"--json_out={zero1}"] + [f"--gin_bindings={b}" for b in TINY]) == 0
    z = json.loads(zero1.read_text())
    assert z["zero1"] and z["mesh"]["data"] == 8
    assert z["opt_state_bytes"] < 0.3 * z["params_bytes"]


def test_tpu_topology_needs_libtpu():
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed: the topology really resolves here")
    from kinoe_jax.aot import main

    with pytest.raises(SystemExit, match="libtpu"):
        main(["--gin_file=gin_configs/models/tiny_ja.gin", "--tpu_topology=v5p:2x2x1", "--skip_flop_count"])

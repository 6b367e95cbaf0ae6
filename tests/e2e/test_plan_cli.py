"""`python -m kinoe_jax.aot` beyond one slice: --plan's verdicts and the bad inputs that exit 2."""

import json

import gin
import pytest

from kinoe_jax.aot import main

TINY = ["ModelConfig.vocab_size = 4000", "ModelConfig.hidden_size = 64", "ModelConfig.intermediate_size = 128",
        "ModelConfig.num_layers = 2", "ModelConfig.num_heads = 4", "ModelConfig.num_kv_heads = 2",
        "ModelConfig.max_seq_len = 64"]
BASE = ["--gin_file=gin_configs/models/tiny_ja.gin", "--seq_len=64", "--global_batch=8"] + [
    f"--gin_bindings={b}" for b in TINY]


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


@pytest.mark.slow
def test_plan_ranks_the_candidates(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--plan", "--num_devices=8", "--train_tokens=1e9", f"--json_out={out}", *BASE]) == 0
    text = capsys.readouterr().out
    assert "rank  layout" in text and "best: " in text
    rows = json.loads(out.read_text())["candidates"]
    # One process: HSDP is flat FSDP, so it is compiled once; each layout under two remats.
    assert sorted({(r["layout"], r["remat"]) for r in rows}) == [
        ("fsdp", "dots_no_batch"), ("fsdp", "full"), ("hsdp+tensor4", "dots_no_batch"), ("hsdp+tensor4", "full")]
    steps = [r["estimated_step_s"] for r in rows]
    assert steps == sorted(steps) and all(r["fits"] for r in rows)


def test_plan_where_nothing_fits_names_the_closest(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--plan", "--num_devices=8", "--device_memory_gb=0.0001", "--plan_layouts=fsdp", "--plan_remats=full",
                 f"--json_out={out}", *BASE]) == 1
    text = capsys.readouterr().out
    assert "NOTHING FITS: the closest is" in text and "GB per device of 0.0001 GB" in text


@pytest.mark.parametrize("args, message", [
    (["--target=v9x-8"], "unknown target 'v9x-8'"),
    (["--target=3xh100-8"], "GPU hosts are counted in the GPU number"),
    (["--plan", "--num_devices=8", "--plan_layouts=ring"], "unknown plan layout(s) ['ring']"),
    (["--num_devices=8", "--gin_bindings=make_mesh.devices_per_granule = 4",
      "--gin_bindings=make_mesh.outer_fsdp = 3"], "do not divide the 2 hosts"),
    (["--num_devices=8", "--gin_bindings=make_mesh.devices_per_granule = 4", "--gin_bindings=make_mesh.data = 1",
      "--gin_bindings=make_mesh.fsdp = -1", "--gin_bindings=make_mesh.outer_data = 2"],
     "axis data of size 1 cannot span 2 hosts"),
])
def test_bad_targets_and_layouts_exit_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "fit.json"
    with pytest.raises(SystemExit) as e:
        main([*BASE, *args, f"--json_out={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()

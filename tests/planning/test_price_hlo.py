"""`--price_hlo` prices a compiled program from anywhere with the fit check's estimator."""

import json

import gin
import pytest

from kinoe_jax.aot import main

_HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: bf16[64,128], w: bf16[128,128]) -> (bf16[64,128], f32[1024]) {
  %x = bf16[64,128] parameter(0)
  %w = bf16[128,128] parameter(1)
  %y = bf16[64,128] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = f32[1024] constant({...})
  %r = f32[1024] all-reduce(%g), channel_id=1, replica_groups=[8,2]<=[2,8]T(1,0), use_global_device_ids=true, to_apply=%add
  ROOT %t = (bf16[64,128], f32[1024]) tuple(%y, %r)
}
"""


@pytest.fixture(autouse=True)
def _clean_gin():
    yield
    gin.clear_config()


def test_price_hlo_writes_the_fit_checks_keys(tmp_path, capsys):
    hlo, out = tmp_path / "step.hlo.txt", tmp_path / "priced.json"
    hlo.write_text(_HLO)
    assert main([f"--price_hlo={hlo}", "--target=h100-16", "--tokens_per_step=1024", "--seq_len=64",
                 "--gin_file=gin_configs/models/tiny_ja.gin", f"--json_out={out}"]) == 0
    r = json.loads(out.read_text())
    assert r["matmul_flops"] == pytest.approx(2 * 64 * 128 * 128 * 16)  # per device x 16 devices
    # Groups {0,8},{1,9},...: each pairs a GPU of host 0 with one of host 1.
    assert r["collectives_by_tier"] == {"InfiniBand": pytest.approx(2 * 4096 / 2)}
    for key in ("roofline_s", "estimated_step_s", "ideal_bytes_by_tier", "estimate_mfu", "total_bytes"):
        assert key in r
    assert r["estimated_step_s"] > r["roofline_s"]  # nothing hides a collective outside a loop
    assert "networks per step and device: InfiniBand" in capsys.readouterr().out


def test_price_hlo_needs_a_target_and_the_tokens(tmp_path):
    hlo = tmp_path / "step.hlo.txt"
    hlo.write_text(_HLO)
    with pytest.raises(SystemExit) as e:
        main([f"--price_hlo={hlo}", "--gin_file=gin_configs/models/tiny_ja.gin", "--num_devices=8"])
    assert e.value.code == 2 and "--price_hlo needs --target and --tokens_per_step" in str(e.value)

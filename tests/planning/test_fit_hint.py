"""A report that does not fit names the documented switch most likely to make it fit."""

import dataclasses

from kinoe_jax.planning.fit import FitReport, fit_hint

GB = 1e9


def _report(**changes) -> FitReport:
    base = {f.name: None for f in dataclasses.fields(FitReport) if f.default is dataclasses.MISSING}
    base.update(model={"remat_policy": "dots_no_batch"}, mesh={"data": 8, "fsdp": 1}, num_devices=8, grad_accum=1,
                params_bytes=10 * GB, opt_state_bytes=20 * GB, min_state_bytes=30 * GB / 8, temp_bytes=60 * GB,
                total_bytes=90 * GB, device_memory_gb=80.0)
    base.update(changes)
    return FitReport(**base)


def test_state_held_whole_points_to_fsdp():
    assert "FSDP" in fit_hint(_report())


def test_state_that_fills_the_devices_points_to_a_larger_slice():
    r = _report(mesh={"data": 1, "fsdp": 8}, params_bytes=25 * GB, opt_state_bytes=50 * GB, min_state_bytes=75 * GB)
    assert "larger slice" in fit_hint(r)


def test_activations_point_to_full_remat_then_accumulation():
    sharded = {"mesh": {"data": 1, "fsdp": 8}, "min_state_bytes": 30 * GB}
    assert "remat 'full'" in fit_hint(_report(**sharded))
    full = _report(model={"remat_policy": "full"}, grad_accum=2, **sharded)
    assert "--grad_accum=4" in fit_hint(full)

"""The network each collective uses, read from the compiled program's replica groups."""

import pytest

from kinoe_jax.hardware.chips import CHIPS
from kinoe_jax.planning import hlo_stats, network

_HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[1024]) -> (f32[1024], f32[1024], f32[4096]) {
  %x = f32[1024] parameter(0)
  %inside = f32[1024] all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %across = f32[1024] all-reduce(%x), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add
  %gather = f32[4096] all-gather(%x), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %t = (f32[1024], f32[1024], f32[4096]) tuple(%inside, %across, %gather)
}
"""


def test_groups_inside_a_granule_are_inner_and_across_are_outer():
    """Two granules of 4: {0..3},{4..7} stay inside; the transposed iota groups {0,4},{1,5},...
    cross; [2,4]<=[8] is {0..3},{4..7} again."""
    stats = hlo_stats.analyze(_HLO, 8, granule_of=[0, 0, 0, 0, 1, 1, 1, 1])
    kib = 4096.0
    assert stats.tier_bytes["inner"] == pytest.approx(2 * kib * 3 / 4 + kib * 3)
    assert stats.tier_bytes["outer"] == pytest.approx(2 * kib * 1 / 2)
    assert not stats.tier_loop_bytes  # nothing here runs inside a loop


def test_one_granule_is_all_inner():
    stats = hlo_stats.analyze(_HLO, 8, granule_of=[0] * 8)
    assert set(stats.tier_bytes) == {"inner"}


_MEGASCALE = """HloModule m

ENTRY %main (x: f32[1,256]) -> (f32[2,256], u32[], token[]) {
  %x = f32[1,256] parameter(0)
  %tok = token[] after-all()
  %s = (f32[1,256], u32[], token[]) send(%x, %tok), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-gather.1_0",_xla_megascale_transfer_type="ALL_GATHER"}
  ROOT %r = (f32[2,256], u32[], token[]) recv(%tok), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-gather.1_0",_xla_megascale_transfer_type="ALL_GATHER"}
}
"""


def test_transfers_between_tpu_slices_are_the_slow_network():
    """libtpu compiles the cross-slice part of a collective into megascale send/recv pairs:
    each device receives the other slice's piece (1 KiB) over the data-centre network."""
    stats = hlo_stats.analyze(_MEGASCALE, 16, granule_of=[0] * 8 + [1] * 8)
    assert stats.tier_bytes == {"outer": pytest.approx(1024.0)}
    assert stats.collective_bytes["all-gather"] == pytest.approx(1024.0)


def test_exposed_communication_adds_to_compute():
    """Outside every loop nothing hides a collective: the estimate is compute plus its time."""
    stats = hlo_stats.analyze(_HLO, 8, granule_of=[0, 0, 0, 0, 1, 1, 1, 1])
    chip = CHIPS["h100"]
    est = network.estimate(stats, [], chip, compute_s=1e-3)
    outer_s = stats.tier_bytes["outer"] / (chip.outer_gbps * 1e9)
    inner_s = stats.tier_bytes["inner"] / (chip.inner_gbps * 1e9)
    assert est.collectives_by_tier == {"NVLink": stats.tier_bytes["inner"], "InfiniBand": stats.tier_bytes["outer"]}
    assert est.estimated_step_s == pytest.approx(1e-3 + outer_s + inner_s)

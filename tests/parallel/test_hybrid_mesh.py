"""The hybrid mesh: outer sizes over granules (TPU slices, GPU hosts), inner sizes inside them."""

import numpy as np
import pytest

from kinoe_jax.parallel.mesh import granules_of, make_mesh, tier_of_axes


def _granule_ids(mesh, per_granule):
    return np.vectorize(lambda d: d.id // per_granule)(mesh.devices)


def test_hsdp_keeps_fsdp_inside_a_granule():
    """8 CPU devices as two granules of 4: HSDP puts the granules on data, fsdp inside one."""
    mesh = make_mesh(data=-1, fsdp="inner", devices_per_granule=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    ids = _granule_ids(mesh, 4)
    for d in range(2):
        assert len(set(ids[d].flat)) == 1  # every fsdp group is one granule
    assert set(ids[:, 0, 0, 0]) == {0, 1}
    assert tier_of_axes(mesh, 4) == {"data": "outer", "fsdp": "inner", "tensor": "inner", "expert": "inner"}


def test_flat_fsdp_spans_the_granules():
    mesh = make_mesh(data=1, fsdp=-1, devices_per_granule=4)
    assert dict(mesh.shape)["fsdp"] == 8
    assert tier_of_axes(mesh, 4)["fsdp"] == "outer"


def test_tensor_inside_with_fsdp():
    mesh = make_mesh(data=-1, fsdp="inner", tensor=2, devices_per_granule=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    ids = _granule_ids(mesh, 4)
    assert all(len(set(ids[d].flat)) == 1 for d in range(2))


@pytest.mark.parametrize("kwargs, message", [
    ({"data": 2, "fsdp": 4, "outer_data": 1, "outer_fsdp": 3}, "span 3 hosts, the devices form 2"),
    ({"data": 1, "fsdp": 8, "outer_data": 2}, "axis data of size 1 cannot span 2 hosts"),
    ({"data": 2, "fsdp": 4, "outer_data": None, "outer_fsdp": 3}, "do not divide the 2 hosts"),
    ({"data": -1, "fsdp": 3}, "not divisible"),
    ({"data": -1, "fsdp": "inner", "tensor": 3}, "do not divide the 4 devices of a granule"),
])
def test_bad_layouts_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        make_mesh(devices_per_granule=4, **kwargs)
    assert message in str(e.value).splitlines()[0]  # the line the command lines print


def test_two_tpu_slices_put_slices_on_data():
    """A 2-slice v5p target: slice_index tells the granules; HSDP keeps each fsdp group in a slice."""
    from kinoe_jax.hardware import chips

    devices = chips.target("2xv5p-16").devices()
    assert len(devices) == 16 and len(granules_of(devices)) == 2
    mesh = make_mesh(data=-1, fsdp="inner", devices=devices)
    assert dict(mesh.shape)["data"] == 2
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert all(len(set(slices[d].flat)) == 1 for d in range(2))

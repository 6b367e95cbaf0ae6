"""A run that stops at step 20 on 2 processes x 4 devices and resumes on 1 process x 8 devices (and
the reverse) continues exactly as the run that never changed shape: the same losses over steps
21-30, so the same batches (the built-in corpus, shuffled and packed, as a real run reads it)."""

import os
import shutil

import numpy as np
import pytest
from process_runs import check_ok, losses, start, wait_all

STEPS, STOP = 30, 20
SAVES = ["CheckpointConfig.save_every = 10", "CheckpointConfig.keep = 5"]


def _stopped_at(src, dst, step: int):
    """A copy of a finished run as it was when it stopped after `step` (newer checkpoints gone)."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst / "checkpoints"):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(dst / "checkpoints" / name)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    two, one = root / "two_procs", root / "one_proc"
    check = wait_all([start(two, 2, STEPS, SAVES), start(one, 1, STEPS, SAVES)])
    check_ok(check[0], "2 x 4 reference")
    check_ok(check[1], "1 x 8 reference")
    two_to_one = _stopped_at(two, root / "two_then_one", STOP)
    one_to_two = _stopped_at(one, root / "one_then_two", STOP)
    # grad_accum 8 cannot cut the 2-shard stream's 4 rows a shard into 8 micro-batches: refused.
    refused = _stopped_at(two, root / "refused", STOP)
    results = wait_all([start(two_to_one, 1, STEPS, SAVES), start(one_to_two, 2, STEPS, SAVES),
                        start(refused, 1, STEPS, SAVES + ["DataConfig.grad_accum = 8"])])
    return {"two": two, "one": one, "two_to_one": two_to_one, "one_to_two": one_to_two, "refused": refused,
            "results": results}


@pytest.mark.slow
@pytest.mark.parametrize("elastic,reference", [("two_to_one", "two"), ("one_to_two", "one")])
def test_a_changed_process_count_continues_with_the_same_losses(runs, elastic, reference):
    check_ok(runs["results"][0 if elastic == "two_to_one" else 1], elastic)
    got, want = losses(runs[elastic]), losses(runs[reference])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    steps = range(STOP + 1, STEPS + 1)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5, atol=0,
                               err_msg=f"{elastic}: steps {STOP + 1}-{STEPS} differ from the run that never changed shape")
    # The two shapes cut the stream differently from the start (1 shard or 2): their losses are not
    # the same numbers, so the agreement above comes from continuing each run's own stream.
    assert abs(losses(runs["one"])[STEPS] - losses(runs["two"])[STEPS]) > 1e-4


@pytest.mark.slow
def test_the_checkpoint_keeps_its_shard_count(runs):
    for name, count in (("two_to_one", 2), ("one_to_two", 1)):
        saved = sorted(n for n in os.listdir(runs[name] / "checkpoints" / str(STEPS) / "data_iter")
                       if n.startswith(("shard_", "process_")))
        assert saved == [f"shard_{i}-of-{count}" for i in range(count)], (name, saved)
    log = (runs["two_to_one"] / "logs" / "process_0.log").read_text()
    assert "data iterator state" not in log and "starts from its beginning" not in log


@pytest.mark.slow
def test_a_change_that_cannot_be_exact_is_refused_in_one_line_before_any_step(runs):
    (r,) = runs["results"][2]
    assert r["rc"] == 2, r["err"][-3000:]
    lines = [ln for ln in r["err"].splitlines() if ln.strip()]
    assert lines[-1].startswith("error: checkpoint step 20") and "grad_accum = 8" in lines[-1], lines[-5:]
    assert "Traceback" not in r["err"] and "ALERT" not in r["err"]
    saved = [int(n) for n in os.listdir(runs["refused"] / "checkpoints") if n.isdigit()]
    assert max(saved) == STOP, f"a step ran before the refusal: checkpoints {sorted(saved)}"

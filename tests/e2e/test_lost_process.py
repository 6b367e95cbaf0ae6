"""A process that dies outright (SIGKILL: an out-of-memory kill, a lost host) ends the survivors
calmly: one line naming it and the newest committed checkpoint, no traceback or C++ stack on the
terminal, the distinct exit status, the record in logs/first_error.json and the crash alert.

When the dead process is process 0, which hosts the coordination service, JAX's runtime in the
survivors aborts within a second of losing it, from a C++ thread, before any Python can run: then
the terminal stays clean and the survivor's log holds JAX's message."""

import json
import re

import pytest
from process_runs import start, wait_all

from kinoe_jax.parallel.multihost import EXIT_PEER_LOST, read_first_error

# The kill comes after step 8 (and its checkpoint); our verdict comes after peer_silence_s
# (10 s), JAX's own, which would abort the survivor, after heartbeat_timeout_s.
FAULT = ["CheckpointConfig.save_every = 4", "fault_point.at_step = 8", "fault_point.kind = 'kill'",
         "DistributedConfig.heartbeat_timeout_s = 20"]
CPP_STACK = re.compile(r"stack trace|Check failure|^F\d{4} |terminate called|Aborted|Fatal Python", re.MULTILINE)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Process 1 killed in one run, process 0 (which hosts the coordination service) in another."""
    root = tmp_path_factory.mktemp("killed")
    peer, coordinator = root / "peer", root / "coordinator"
    results = wait_all([start(peer, 2, 12, FAULT + ["fault_point.process = 1"]),
                        start(coordinator, 2, 12, FAULT + ["fault_point.process = 0"])])
    return {"peer": (peer, results[0], 1), "coordinator": (coordinator, results[1], 0)}


def _survivor(killed, which):
    workdir, results, dead = killed[which]
    gone, r = results[dead], results[1 - dead]
    assert gone["rc"] == -9
    assert r["end"] - gone["end"] < 60, f"the survivor took {r['end'] - gone['end']:.0f} s to stop"
    terminal = r["out"] + r["err"]
    assert "Traceback" not in terminal and not CPP_STACK.search(terminal), terminal[-4000:]
    return workdir, r, dead, 1 - dead


@pytest.mark.slow
def test_when_the_coordinator_dies_jax_ends_the_survivor_and_its_log_says_why(killed):
    workdir, r, _, survivor = _survivor(killed, "coordinator")
    if r["rc"] == EXIT_PEER_LOST:  # a runtime that lets us speak first: the peer test's checks
        _check_calm_end(workdir, r, 0, survivor)
        return
    assert r["rc"] == -6, r["err"][-3000:]  # JAX's abort
    log = (workdir / "logs" / f"process_{survivor}.log").read_text()
    assert "Terminating process because the JAX distributed service detected fatal errors" in log


@pytest.mark.slow
def test_a_killed_process_ends_the_survivor_calmly(killed):
    _check_calm_end(*_survivor(killed, "peer"))


def _check_calm_end(workdir, r, dead, survivor):
    terminal = r["out"] + r["err"]
    assert r["rc"] == EXIT_PEER_LOST, f"survivor exited {r['rc']}:\n{terminal[-4000:]}"
    lines = [ln for ln in r["err"].splitlines() if ln.startswith("kinoe_jax:")]
    assert len(lines) == 1, r["err"][-4000:]
    line = lines[0]
    assert f"process {dead} of 2" in line and "died" in line, line
    checkpoint = str(workdir / "checkpoints" / "8")
    assert f"newest committed checkpoint: step 8 ({checkpoint})" in line, line

    record = read_first_error(str(workdir))
    assert record and record["kind"] == "lost" and record["lost"] == [dead], record
    assert record["checkpoint_step"] == 8 and record["error"] in line
    alerts = [json.loads(ln) for ln in (workdir / "alerts.jsonl").read_text().splitlines()]
    crash = [a for a in alerts if a["kind"] == "crash"]
    assert len(crash) == 1 and record["error"] in crash[0]["text"], alerts
    # The survivor's log has the whole story, the failed collective's traceback included.
    log = (workdir / "logs" / f"process_{survivor}.log").read_text()
    assert line.removeprefix("kinoe_jax: ") in log and "Traceback" in log

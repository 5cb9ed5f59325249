"""hf_flag.harness.claims: exclusive claims under a race, leases renewed by the holder, takeover of dead holders (killed
here: at once; on another machine: when the lease runs out), no takeover of a reused pid, lost claims noticed."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_flag.harness import claims
from hf_flag.harness.claims import Claims, Owner

REPO = Path(__file__).resolve().parents[2]


def claim_in_child(folder: str, queue, release) -> None:
    owner = Owner.this_process()
    with Claims(owner, lease_s=60) as mine:
        queue.put((owner.token, mine.try_claim(folder)))
        release.wait(120)  # keep holding until every process has tried


def test_exactly_one_of_eight_racing_processes_gets_the_claim(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue, release = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=claim_in_child, args=(str(tmp_path / "unit"), queue, release)) for _ in range(8)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in procs]
    finally:
        release.set()
        for p in procs:
            p.join(timeout=60)
    winners = [token for token, other in results if other is None]
    assert len(winners) == 1
    # every loser was shown the winner's claim, not some intermediate state
    assert {other["token"] for token, other in results if other is not None} == set(winners)
    assert not (tmp_path / "unit" / claims.CLAIM).exists()  # the winner released it on leaving


def test_claim_release_and_second_owner(tmp_path):
    a, b = Claims(Owner.this_process("a"), lease_s=60), Claims(Owner.this_process("b"), lease_s=60)
    unit = tmp_path / "unit"
    assert a.try_claim(unit, rank=3) is None
    assert a.try_claim(unit) is None  # holding already: still ours
    other = b.try_claim(unit)
    assert other is not None and other["owner"] == "a" and other["token"] == a.owner.token
    assert a.holds(unit) and not b.holds(unit)
    b.release(unit)  # not b's claim: nothing is removed
    assert a.holds(unit)
    a.release(unit)
    assert not (unit / claims.CLAIM).exists()
    assert b.try_claim(unit) is None and b.holds(unit)
    assert sorted(p.name for p in unit.iterdir()) == [claims.LOCK, claims.CLAIM]  # no temporary file left


def test_claim_of_a_killed_process_is_taken_over_at_once(tmp_path):
    unit = tmp_path / "unit"
    code = ("import sys, time; from hf_flag.harness.claims import Claims, Owner; c = Claims(Owner.this_process(), 3600);"
            "assert c.try_claim(sys.argv[1]) is None; print('claimed', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(unit)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "claimed"
        taker = Claims(Owner.this_process(), lease_s=60)
        held = taker.try_claim(unit)
        assert held is not None and held["pid"] == proc.pid  # alive: its claim holds
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert claims.read_claim(unit)["expires"] > time.time() + 3000  # the lease is far from expired ...
        assert taker.try_claim(unit) is None  # ... but its process is gone
        assert taker.holds(unit)
    finally:
        proc.kill()
        proc.wait()


def write_claim(unit: Path, **fields) -> None:
    unit.mkdir(parents=True, exist_ok=True)
    (unit / claims.CLAIM).write_text(json.dumps({"token": "t-other", "owner": "x", **fields}))


def test_claim_from_another_machine_lasts_until_its_lease_expires(tmp_path):
    unit = tmp_path / "unit"
    me = Claims(Owner.this_process(), lease_s=60)
    write_claim(unit, host="some-other-host", pid=os.getpid(), pid_start=None, expires=time.time() + 3600)
    assert me.try_claim(unit)["host"] == "some-other-host"  # cannot see its process: the lease decides
    write_claim(unit, host="some-other-host", pid=1, pid_start=None, expires=time.time() - 1)
    assert me.try_claim(unit) is None


def test_reused_pid_does_not_keep_a_claim(tmp_path):
    unit = tmp_path / "unit"
    me = Claims(Owner.this_process(), lease_s=60)
    mine = claims.process_start(os.getpid())
    assert mine is not None and claims.pid_running(os.getpid(), mine)
    write_claim(unit, host=socket.gethostname(), pid=os.getpid(), pid_start=str(int(mine) + 1),
                expires=time.time() + 3600)
    assert me.try_claim(unit) is None  # same pid, other start time: the claimer is gone


def test_renewal_keeps_the_claim_and_a_lost_claim_is_noticed(tmp_path):
    unit = tmp_path / "unit"
    other = Claims(Owner.this_process("other"), lease_s=60)
    with Claims(Owner.this_process("holder"), lease_s=0.8) as holder:
        assert holder.try_claim(unit) is None
        first = claims.read_claim(unit)["expires"]
        deadline = time.monotonic() + 60
        while claims.read_claim(unit)["expires"] == first:  # the renewal thread extends the lease
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert holder.holds(unit)
        holder.stop.set()  # simulate a stall: renewals stop, the lease runs out, another process takes over
        holder.thread.join()
        while other.try_claim(unit) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        holder.renew()
        assert not holder.holds(unit) and unit in holder.lost and unit not in holder.held
    assert other.holds(unit)  # leaving the block released only what the holder still held


def test_lease_must_be_positive():
    with pytest.raises(ValueError, match="lease_s"):
        Claims(Owner.this_process(), lease_s=0)


NO_FCNTL_RACE = """
import multiprocessing, sys, warnings
sys.modules["fcntl"] = None  # a platform without fcntl (Windows): importing it raises ImportError
warnings.simplefilter("ignore")  # filelock says it falls back to its soft lock
from hf_flag.harness.claims import Claims, Owner

def claim(folder, queue, release):
    owner = Owner.this_process()
    with Claims(owner, lease_s=60) as mine:
        queue.put((owner.token, mine.try_claim(folder)))
        release.wait(120)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    queue, release = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=claim, args=(sys.argv[1], queue, release)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    release.set()
    for p in procs:
        p.join(timeout=60)
    winners = [token for token, other in results if other is None]
    losers_saw = {other["token"] for token, other in results if other is not None}
    print(len(winners), losers_saw == set(winners))
"""


def test_claims_exclude_each_other_without_fcntl(tmp_path):
    """Claims lock through filelock, so they work (and still exclude racing processes) where fcntl does not exist."""
    script = tmp_path / "race.py"
    script.write_text(NO_FCNTL_RACE)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "unit")], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "True"]
    assert not (tmp_path / "unit" / claims.CLAIM).exists()  # the winner released it on leaving


def test_a_folder_removed_with_its_claim_is_not_made_again(tmp_path):
    unit = tmp_path / "unit"
    me = Claims(Owner.this_process(), lease_s=60)
    assert me.try_claim(unit) is None
    for p in unit.iterdir():
        p.unlink()
    unit.rmdir()  # a finished run's bookkeeping removed
    me.release(unit)
    assert not unit.exists()
    with pytest.raises(FileNotFoundError):
        with claims.locked(unit, create=False):
            pass
    assert not unit.exists()


def test_clear_stale_removes_only_a_dead_holders_claim(tmp_path):
    unit = tmp_path / "unit"
    write_claim(unit, host=socket.gethostname(), pid=os.getpid(), pid_start=claims.process_start(os.getpid()),
                expires=time.time() + 3600)
    claims.clear_stale(unit)
    assert claims.read_claim(unit)["token"] == "t-other"  # its process (this one) runs: the claim stays
    write_claim(unit, host=socket.gethostname(), pid=os.getpid(), pid_start="0", expires=time.time() + 3600)
    claims.clear_stale(unit)
    assert not (unit / claims.CLAIM).exists()  # same pid, another start time: its holder is gone
    claims.clear_stale(unit)  # no claim: nothing to do
    claims.clear_stale(tmp_path / "gone")  # no folder: nothing made
    assert not (tmp_path / "gone").exists()

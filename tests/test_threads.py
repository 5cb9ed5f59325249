"""Thread share per process (hf_flag.threads): cores split among the processes on a machine, capped by the cores
idle in a short sample of current CPU use (not the 1-minute load average)."""
import os

import psutil

import hf_flag.threads as threads
from hf_flag.threads import busy_cores, parse_cpu_list, percpu_ids, thread_share

CpuTimes = type(psutil.cpu_times())


def times(busy: float, idle: float) -> CpuTimes:
    """A per-CPU sample: ``busy`` seconds of user time, ``idle`` seconds idle, every other field 0."""
    return CpuTimes(**{f: {"user": busy, "idle": idle}.get(f, 0.0) for f in CpuTimes._fields})


def test_share_of_cores_among_local_processes():
    assert thread_share({}, cpus=range(16), busy=0.0) == 16
    assert thread_share({"LOCAL_WORLD_SIZE": "4"}, cpus=range(16), busy=0.0) == 4
    assert thread_share({"LOCAL_WORLD_SIZE": "3"}, cpus=range(16), busy=0.0) == 5
    assert thread_share({"WORLD_SIZE": "8"}, cpus=range(2), busy=0.0) == 1  # never 0
    assert thread_share({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "16"}, cpus=range(16), busy=0.0) == 8  # local first


def test_busy_machine_and_explicit_setting():
    assert thread_share({}, cpus=range(2), busy=2.0) == 1  # both cores busy: one thread
    assert thread_share({}, cpus=range(16), busy=6.2) == 10
    assert thread_share({"OMP_NUM_THREADS": "3"}, cpus=range(16), busy=15.0) == 3  # the user's choice wins
    assert thread_share({"OMP_NUM_THREADS": "junk", "LOCAL_WORLD_SIZE": "2"}, cpus=range(8), busy=0.0) == 4


def test_busy_cores_from_two_samples():
    before = [times(100.0, 500.0), times(200.0, 400.0), times(0.0, 0.0)]
    # CPU 0 fully busy for 0.1 s, CPU 1 a quarter busy, CPU 2 idle
    after = [times(100.1, 500.0), times(200.025, 400.075), times(0.0, 0.1)]
    assert abs(busy_cores(before, after, [0, 1, 2], range(3)) - 1.25) < 1e-9
    assert abs(busy_cores(before, after, [1, 2], range(3)) - 0.25) < 1e-9  # only the usable CPUs count
    iowait = CpuTimes(**{f: {"iowait": 0.1}.get(f, 0.0) for f in CpuTimes._fields}) if "iowait" in CpuTimes._fields \
        else times(0.0, 0.1)
    assert busy_cores([times(0.0, 0.0)], [iowait], [0], [0]) == 0.0  # waiting for the disk is not work


def test_busy_cores_maps_cpu_ids_to_psutils_entries_of_online_cpus():
    """psutil lists the online CPUs only, in order: with CPU 1 offline its entries are CPUs 0, 2, 3."""
    # CPU 0 fully busy, CPU 2 idle, CPU 3 half busy, over 0.1 s
    before = [times(0.0, 0.0)] * 3
    after = [times(0.1, 0.0), times(0.0, 0.1), times(0.05, 0.05)]
    assert abs(busy_cores(before, after, [2, 3], [0, 2, 3]) - 0.5) < 1e-12  # by id: not entries 2 and 3
    assert abs(busy_cores(before, after, [0, 3], [0, 2, 3]) - 1.5) < 1e-12  # non-contiguous affinity
    assert abs(busy_cores(before, after, [2], [0, 2, 3]) - 0.0) < 1e-12
    # an affinity id that is offline, or ids unknown: the machine-wide busy fraction (1.5 of 3 cores) per usable CPU
    assert abs(busy_cores(before, after, [1, 2], [0, 2, 3]) - 2 * 0.5) < 1e-12
    assert abs(busy_cores(before, after, [0, 5, 7], None) - 3 * 0.5) < 1e-12
    assert busy_cores(before, after[:2], [0], [0, 2, 3]) == 0.0  # a CPU went offline between the samples


def test_percpu_ids_from_the_online_list(monkeypatch, tmp_path):
    assert parse_cpu_list("0,2-3,5\n") == [0, 2, 3, 5] and parse_cpu_list("0-1") == [0, 1]
    online = tmp_path / "online"
    online.write_text("0,2-3\n")
    monkeypatch.setattr(threads, "ONLINE_CPUS", online)
    assert percpu_ids(3) == [0, 2, 3]
    monkeypatch.setattr(threads, "ONLINE_CPUS", tmp_path / "absent")  # not Linux: only "none offline" is known
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 4)
    assert percpu_ids(4) == [0, 1, 2, 3] and percpu_ids(3) is None
    # the live sample through thread_share: affinity {2, 3} of 4 CPUs with CPU 1 offline (3 psutil entries)
    monkeypatch.setattr(threads, "ONLINE_CPUS", online)
    idle, cpu0_busy = [times(0.0, 0.0)] * 3, [times(0.1, 0.0), times(0.0, 0.1), times(0.0, 0.1)]
    samples = iter([idle, cpu0_busy])
    monkeypatch.setattr(threads.psutil, "cpu_times", lambda percpu: next(samples))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert thread_share({}, cpus=[2, 3]) == 2  # CPUs 2 and 3 (entries 1, 2) are idle; only CPU 0 works


def test_second_command_after_a_finished_run_gets_its_full_share(monkeypatch):
    """Right after a run ends the 1-minute load average still reads ~2 on 2 cores; the CPUs are idle now, so the
    next command takes both cores.  A machine busy now still lowers the share."""
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 1.5, 1.0))
    idle_then, idle_now = [times(10.0, 10.0)] * 2, [times(10.0, 10.1)] * 2
    busy_now = [times(10.1, 10.0)] * 2
    samples = iter([idle_then, idle_now, idle_then, busy_now])
    monkeypatch.setattr(threads.psutil, "cpu_times", lambda percpu: next(samples))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert thread_share({}, cpus=[0, 1]) == 2
    assert thread_share({}, cpus=[0, 1]) == 1

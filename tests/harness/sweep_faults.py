"""Fault injection for the sweep tests: one process imports the sweep once, then forks sweeps from that image.

``python tests/harness/sweep_faults.py PLAN.json`` reads a list of *steps*; each step is a list of sweeps started
together (forked children running ``hf_flag.harness.sweep.main``), each ``{"args": [...], "name": str}`` plus optional
``"kill_event": k`` (the child sends itself SIGKILL, or ``"signal": "SIGTERM"``, at the k-th *event* of its main
thread; ``"kill_seed"`` with ``"kill_events": "<name of an earlier sweep>"`` draws k uniformly from that sweep's
events), ``"fsize": bytes`` (RLIMIT_FSIZE, SIGXFSZ ignored: writes
past it fail with EFBIG, as on a full disk) and ``"read_only": folder`` (root only: the child remounts that folder
read-only in a mount namespace of its own, so only it sees EROFS there; exit 98 when that is not possible).  Every
analysis a child starts is appended to ``LOG`` (``O_APPEND``: one line per write) as ``{"pid", "out", "model",
"layers"}``.  Writes one JSON line per sweep to
stdout: name, exit code or signal, seconds, its stderr, the layer checkpoints finished on disk after it, its number
of events and the event it was killed at.

An event is the moment just before and the moment just after each ``os.replace`` / ``os.rename`` (every atomic
write's commit, every claim, marker, report, checkpoint, the dataset's renames), each dataset swap
(``sweep.swap_paths``) and each analysis (``sweep.analyze_layers``), counted on the main thread only (the claims'
renewal thread writes on a clock).  A sweep's events do not depend on the machine's speed, so a kill at event k
lands at the same point of the work on every machine, and k below the count of an uninterrupted sweep interrupts
it mid-run by construction.

Forking from one warm image makes a sweep cost its own work only (no interpreter start, no imports), so dozens of
killed-and-resumed sweeps fit in a test.
"""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import accelerate  # noqa: E402, F401  - everything a sweep imports, imported once here
import datasets  # noqa: E402, F401
import torch  # noqa: E402

import hf_flag.harness.plots  # noqa: E402, F401
import hf_flag.analysis.api  # noqa: E402, F401
import hf_flag.integrations.cards  # noqa: E402, F401
from hf_flag.harness import schedule, sweep  # noqa: E402

torch.set_num_threads(1)


def logged_analyze_layers(log: str):
    original = sweep.analyze_layers

    def analyze_layers(spec, cfg, device, layers):
        line = json.dumps({"pid": os.getpid(), "out": str(cfg.out), "model": spec.label,
                           "layers": None if layers is None else list(layers)})
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
        return original(spec, cfg, device, layers)

    return analyze_layers


class Events:
    """Counts the events of the main thread (see the module docstring) and signals this process at event ``kill``."""

    def __init__(self, kill: int | None, signum: int, record: str):
        self.count, self.kill, self.signum, self.record = 0, kill, signum, record

    def point(self, what: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.count += 1
        if self.count == self.kill:
            Path(self.record).write_text(json.dumps({"kill_event": self.count, "kill_at": what}))
            os.kill(os.getpid(), self.signum)

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            what = f"{name} {args[0] if args else ''}"
            self.point("before " + what)
            result = original(*args, **kwargs)
            self.point("after " + what)
            return result

        setattr(owner, name, wrapped)


def remount_read_only(folder: str) -> None:
    """Bind-mount ``folder`` read-only onto itself in a new mount namespace (this process only)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 0x20000, 1, 32, 4096, 16384, 1 << 18
    path = os.fsencode(folder)
    for ok in (lambda: libc.unshare(clone_newns), lambda: libc.mount(b"none", b"/", None, ms_rec | ms_private, None),
               lambda: libc.mount(path, path, None, ms_bind, None),
               lambda: libc.mount(path, path, None, ms_remount | ms_bind | ms_rdonly, None)):
        if ok() != 0:
            raise OSError(ctypes.get_errno(), "mount namespace", folder)


def child(job: dict, log: str, err_path: str) -> None:
    """Runs in the forked child: never returns."""
    code = 1
    events = Events(job.get("kill_event"), getattr(signal, job.get("signal", "SIGKILL")), err_path + ".kill")
    try:
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        os.close(fd)
        if job.get("fsize") is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        if job.get("read_only") is not None:
            try:
                remount_read_only(job["read_only"])
            except OSError:
                os._exit(98)
        sweep.analyze_layers = logged_analyze_layers(log)
        for owner, name in ((os, "replace"), (os, "rename"), (sweep, "swap_paths"), (sweep, "analyze_layers")):
            events.wrap(owner, name)
        code = sweep.main(job["args"])
    except BaseException:  # noqa: BLE001 - report anything that escapes main as exit 99
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        Path(err_path + ".events").write_text(str(events.count))
        os._exit(code)


def finished_checkpoints(out: Path) -> list[str]:
    """Layer checkpoints whose result is on disk (``runs/<slug>/layers/<a>-<b>``)."""
    return sorted(str(p.parent.relative_to(out)) for p in out.glob(f"runs/*/layers/*/{schedule.DONE}"))


def out_of(args: list[str]) -> Path:
    return Path(args[args.index("--out") + 1])


def read_events(err: str) -> tuple[int | None, dict]:
    """What a child left: its number of events (``None`` when it was killed before writing it) and, when it was
    killed at an event, which one."""
    count, kill = Path(err + ".events"), Path(err + ".kill")
    return (int(count.read_text()) if count.exists() else None), (json.loads(kill.read_text()) if kill.exists() else {})


def run_step(step: list[dict], log: str, tmp: Path, events: dict[str, int]) -> list[dict]:
    records = []
    started = {}
    for i, job in enumerate(step):
        err = str(tmp / f"{job['name']}.{i}.stderr")
        if job.get("kill_seed") is not None:
            job = {**job, "kill_event": random.Random(job["kill_seed"]).randint(1, events[job["kill_events"]])}
        pid = os.fork()
        if pid == 0:
            child(job, log, err)
        started[pid] = (job, err, time.monotonic())
    for pid, (job, err, t0) in started.items():
        _, status = os.waitpid(pid, 0)
        count, kill = read_events(err)
        records.append({
            "name": job["name"], "pid": pid, "seconds": time.monotonic() - t0, "events": count, **kill,
            "exit": os.waitstatus_to_exitcode(status), "stderr": Path(err).read_text(errors="replace"),
            "checkpoints": finished_checkpoints(out_of(job["args"]))})
    return records


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    tmp = Path(plan["tmp"])
    events: dict[str, int] = {}
    for step in plan["steps"]:
        for record in run_step(step, plan["log"], tmp, events):
            events[record["name"]] = record["events"]
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

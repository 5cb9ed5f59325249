"""FlagAlignmentCallback under a real 2-process CPU DDP run (``accelerate launch --multi_gpu``, gloo backend).

The training script is ``ddp_train.py`` beside this file (a tiny Llama, 20 SGD steps, measured every 5, checkpoints
every 10).  Checks: the run really was DDP with world size 2; only rank 0 measures, logs and writes TensorBoard
events; the logged values equal ``hf_flag.analyze`` of the saved checkpoints; the Trainer's own loss logs survive
(``Trainer.log`` clears ``control.should_log``: before the fix rank 0 skipped the loss all-gather and rank 1 crashed
in a collective mismatch); the callback's state is in the checkpoints; both ranks exit 0 within the timeout.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

from hf_flag.analysis.api import analyze  # noqa: E402
from tests.integrations.ddp_train import build_trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_train.py")
MAX_STEPS, EVERY, SAVE_STEPS, LOGGING_STEPS = 20, 5, 10, 5
FLAG_STEPS = list(range(0, MAX_STEPS + 1, EVERY))
#: logged key (after ``flag/``) -> analyze summary key: kappa beside its baseline, and the law's series (diag D of the
#: gated MLP's up -> down pairs; Llama has no biases, so the decayed view equals the checkpoint)
COMPARED = {"mlp/commutator_ratio": "mlp/commutator_ratio",
            "mlp/commutator_ratio_baseline": "mlp/commutator_ratio_baseline",
            "vo/commutator_ratio": "vo/commutator_ratio", "residual/commutator_ratio": "residual/commutator_ratio",
            "law/mlp/imbalance_diagonal_norm": "mlp/imbalance_diagonal_norm"}
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entries(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in log_history if key in e]


def test_loss_logs_survive_measurement_steps(tmp_path):
    """Single process: at steps where the callback logs, the Trainer's own loss log is kept (control.should_log)."""
    trainer = build_trainer(tmp_path, max_steps=10, every=EVERY, save_steps=0, report_to="none")
    trainer.train()
    assert [s for s, _ in entries(trainer.state.log_history, "flag/mlp/commutator_ratio")] == [0, 5, 10]
    assert [s for s, _ in entries(trainer.state.log_history, "loss")] == [5, 10]


def launch_two_ranks(script: Path, args: list[str], timeout_s: int = TIMEOUT_S) -> str:
    """Run ``script args`` on 2 CPU processes (``accelerate launch --multi_gpu``, gloo); fail the test on a non-zero
    exit, a traceback or a hang (the launcher's whole session is killed); return the output."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own session: it and its two workers
        output, _ = proc.communicate()
        pytest.fail(f"2-process run hung (> {timeout_s} s); output tail:\n{output[-4000:]}")
    assert proc.returncode == 0, f"2-process run failed (rc={proc.returncode}); output tail:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    return output


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    launch_two_ranks(SCRIPT, [str(out), str(MAX_STEPS), str(EVERY), str(SAVE_STEPS)])
    return out


def trainer_state(ddp_run: Path, step: int) -> dict:
    return json.loads((ddp_run / "run" / f"checkpoint-{step}" / "trainer_state.json").read_text())


@pytest.mark.slow
def test_really_two_ddp_ranks_with_synchronised_weights(ddp_run):
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert (info["rank"], info["world_size"], info["args_world_size"]) == (r, 2, 2)
        assert (info["backend"], info["parallel_mode"]) == ("gloo", "ParallelMode.DISTRIBUTED")
        assert info["wrapped_model_class"] == "DistributedDataParallel"
        assert info["global_step"] == MAX_STEPS and info["is_world_process_zero"] == (r == 0)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were all-reduced every step
    assert ranks[0]["flag_steps"] == FLAG_STEPS and ranks[1]["flag_steps"] == []  # rank 0 measures, alone


@pytest.mark.slow
def test_rank0_log_history_matches_analyze_of_checkpoints(ddp_run):
    history = trainer_state(ddp_run, MAX_STEPS)["log_history"]
    for key in COMPARED:
        assert [s for s, _ in entries(history, f"flag/{key}")] == FLAG_STEPS, key
    assert [s for s, _ in entries(history, "loss")] == list(range(LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS))
    summaries = {step: analyze(ddp_run / "run" / f"checkpoint-{step}", cheap=True, composition="none").summary
                 for step in (SAVE_STEPS, MAX_STEPS)}
    for key, name in COMPARED.items():  # the values logged at a step are those of the weights saved at that step
        logged = dict(entries(history, f"flag/{key}"))
        for step, summary in summaries.items():
            assert logged[step] == pytest.approx(summary[name], rel=1e-9), (key, step)
    assert summaries[SAVE_STEPS]["mlp/imbalance_norm"] != pytest.approx(  # it trained between the checkpoints
        summaries[MAX_STEPS]["mlp/imbalance_norm"], rel=1e-6)


@pytest.mark.slow
def test_only_rank0_wrote_tensorboard_events(ddp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writers = sorted(p.parent.name for p in (ddp_run / "tb").rglob("events.out.tfevents.*"))
    assert writers == ["rank0"]
    acc = EventAccumulator(str(ddp_run / "tb" / "rank0"))
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("train/flag/mlp/commutator_ratio")]
    logged = entries(trainer_state(ddp_run, MAX_STEPS)["log_history"], "flag/mlp/commutator_ratio")
    assert [s for s, _ in tb] == FLAG_STEPS
    assert [v for _, v in tb] == pytest.approx([v for _, v in logged], rel=1e-6)  # TensorBoard stores float32


@pytest.mark.slow
def test_callback_state_is_in_the_checkpoints(ddp_run):
    for step in (SAVE_STEPS, MAX_STEPS):
        saved = trainer_state(ddp_run, step)["stateful_callbacks"]["FlagAlignmentCallback"]
        assert saved["args"]["every_n_steps"] == EVERY
        assert saved["attributes"]["last_step"] == step
        series = saved["attributes"]["history"]["mlp/imbalance_diagonal_norm"]
        assert [p[0] for p in series] == FLAG_STEPS[:step // EVERY + 1]

"""``accelerate launch ... tests/harness/sweep_rank_exits.py SWEEP-ARGS``: hf_flag.harness.sweep.main on every rank, except
that rank ``$HF_FLAG_TEST_EXIT_RANK`` leaves silently (``os._exit(0)``: no cleanup, exit status 0, so the launcher
does not stop the others) when it is about to analyse its first unit."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_flag.harness import sweep  # noqa: E402


def leave(*args, **kwargs):
    os._exit(0)


if os.environ.get("RANK") == os.environ["HF_FLAG_TEST_EXIT_RANK"]:
    sweep.run_unit = leave
sys.exit(sweep.main(sys.argv[1:]))

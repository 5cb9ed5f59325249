"""``hf-flag reproduce [--quick] [--out DIR] [--overwrite]``: run every claim's experiment and write
``DIR/reproduction.md`` (default ``DIR``: ``./hf-flag-reproduction``, a new folder).

Regenerating the committed ``docs/reproduction.md`` (with its JSON and figures) is a maintainer's command:
``hf-flag reproduce --out docs --overwrite`` (the full run; never ``--quick``).  Without ``--overwrite`` an
existing report in ``DIR`` is refused before any work.

Equivalent to ``python -m hf_flag.harness.experiments.reproduce``.  Seeded and deterministic (fixed seed, deterministic
algorithms, fixed thread count); CPU by default.  Refuses to overwrite a ``reproduction.md`` it did not generate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from hf_flag.harness.experiments import commutator, neural_collapse, pretrained, resnet, weight_decay
from hf_flag.harness.experiments.common import SEEDS, ClaimResult
from hf_flag.harness.experiments.writer import REPORT_NAME, OverwriteRefusedError, check_writable, write_report

#: (key, module): each module has ``run(cfg, *, threads, device) -> ClaimResult`` and a config class with ``quick()``.
CLAIMS = (
    ("weight_decay", weight_decay, weight_decay.WeightDecayConfig),
    ("commutator", commutator, commutator.CommutatorConfig),
    ("neural_collapse", neural_collapse, neural_collapse.CollapseConfig),
    ("resnet", resnet, resnet.ResNetConfig),
    ("pretrained", pretrained, pretrained.PretrainedConfig),
)


#: where a user's run writes by default: a new folder, never the committed docs/
DEFAULT_OUT = Path("hf-flag-reproduction")
DESCRIPTION = ("Rerun the seeded experiments behind the paper's claims and write DIR/reproduction.md (with its JSON "
               "and figures): evidence for and against each claim.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-flag reproduce", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="small configuration (under 3 minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report already in DIR (maintainers regenerating the committed docs/: "
                        "hf-flag reproduce --out docs --overwrite)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, fixed for determinism (default 1)")
    p.add_argument("--device", default="cpu", help="torch device for the training runs (default cpu)")
    p.add_argument("--claims", default=",".join(k for k, _, _ in CLAIMS),
                   help="comma-separated subset of: " + ", ".join(k for k, _, _ in CLAIMS))
    return p


def run_claims(keys: Sequence[str], *, quick: bool, threads: int, device: torch.device,
               log: Callable[[str], None] = print) -> list[ClaimResult]:
    """Run the named claims in order; each result's ``data["wall_s"]`` records its wall time."""
    results = []
    for key, module, config in CLAIMS:
        if key not in keys:
            continue
        log(f"[reproduce] {key} ...")
        t0 = time.perf_counter()
        result = module.run(config.quick() if quick else config(), threads=threads, device=device)
        result.data["wall_s"] = time.perf_counter() - t0
        log(f"[reproduce] {key}: {result.verdict} ({result.data['wall_s']:.1f} s)")
        results.append(result)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    keys = [k.strip() for k in args.claims.split(",") if k.strip()]
    unknown = sorted(set(keys) - {k for k, _, _ in CLAIMS})
    if unknown or not keys:
        print(f"hf-flag reproduce: --claims {args.claims!r}: unknown {unknown}; choose from "
              f"{[k for k, _, _ in CLAIMS]}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"hf-flag reproduce: --threads {args.threads} must be >= 1", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
        check_writable(args.out)
    except (OverwriteRefusedError, RuntimeError) as err:
        print(f"hf-flag reproduce: {err}", file=sys.stderr)
        return 2
    existing = args.out / REPORT_NAME
    if existing.exists() and not args.overwrite:  # a generated report: replaced only when asked to
        print(f"hf-flag reproduce: {existing} exists; pass --overwrite to replace it (with its JSON and figures) "
              f"or choose another --out", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = run_claims(keys, quick=args.quick, threads=args.threads, device=device)
    meta = {"quick": args.quick, "seeds": list(SEEDS), "threads": args.threads, "device": str(device),
            "torch": torch.__version__, "claims": keys, "wall_s": time.perf_counter() - t0}
    try:
        paths = write_report(results, args.out, meta)
    except OverwriteRefusedError as err:
        print(f"hf-flag reproduce: {err}", file=sys.stderr)
        return 2
    print(f"[reproduce] wrote {paths[-1]} ({len(paths)} files) in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

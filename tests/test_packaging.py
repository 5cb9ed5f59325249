"""setup.cfg lists every package, and the top-level harness/ folder installs as hf_flag.harness (issue #10)."""
from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_options() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["options"]


def test_every_package_is_listed_and_harness_is_inside_hf_flag():
    options = setup_options()
    listed = set(options["packages"].split())
    mapping = dict(line.split("=") for line in options["package_dir"].strip().splitlines())
    mapping = {k.strip(): v.strip() for k, v in mapping.items()}
    assert mapping == {"hf_flag.harness": "harness"}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_flag").rglob("__init__.py")}
    on_disk |= {"hf_flag." + ".".join(p.parent.relative_to(ROOT).parts)
                for p in (ROOT / "harness").rglob("__init__.py")}
    assert listed == on_disk
    assert not any(name == "harness" or name.startswith("harness.") for name in listed)


def test_hf_flag_harness_is_the_harness_folder():
    import hf_flag.harness.sweep as sweep

    assert Path(sweep.__file__).resolve() == ROOT / "harness" / "sweep.py"

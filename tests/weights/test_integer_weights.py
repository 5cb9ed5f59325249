"""Integer-stored weights (review s5 item 3): bitsandbytes int8 (with its ``SCB`` row scales) and GPTQ/AWQ packed
int4 (``qweight``) hold real values only together with scales hf-flag does not apply, so every report path refuses
them with one line naming the tensor and saying to dequantise first, instead of an internal error or the numbers of
the unscaled integers.  A float checkpoint's storage precision is never 0 (float64: 2.2e-16)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_flag import analyze, cli
from hf_flag.errors import WeightSourceError
from hf_flag.weights.sources import open_weights

PATHS = {"default": {}, "cheap": {"cheap": True}, "heads": {"diagnostics": {"heads"}}, "full": {"full": True}}


def quantised_copy(folder: Path, dest: Path, kind: str) -> Path:
    """``folder``'s checkpoint with every projection weight stored as bitsandbytes int8 + SCB, or as GPTQ's
    ``qweight`` (packed int32) + ``scales``."""
    tensors = {}
    for key, value in load_file(folder / "model.safetensors").items():
        if not key.endswith("proj.weight"):
            tensors[key] = value
        elif kind == "int8":
            scb = value.abs().amax(1) / 127
            tensors[key], tensors[key.removesuffix("weight") + "SCB"] = torch.round(value / scb[:, None]).to(
                torch.int8), scb
        else:
            base = key.removesuffix(".weight")
            tensors[base + ".qweight"] = torch.zeros(max(1, value.shape[1] // 8), value.shape[0], dtype=torch.int32)
            tensors[base + ".scales"] = torch.ones(1, value.shape[0], dtype=torch.float16)
    dest.mkdir()
    shutil.copy(folder / "config.json", dest)
    save_file(tensors, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("kind", ["int8", "gptq"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_report_path_refuses_integer_weights(kind, path, tiny_checkpoint, tmp_path):
    model = quantised_copy(tiny_checkpoint, tmp_path / kind, kind)
    stored = "int8" if kind == "int8" else "packed integers"
    with pytest.raises(WeightSourceError, match=rf"tensor '[\w.]+proj\.(q)?weight' of .* is stored as {stored}: "
                                                r"an integer-quantised weight .* dequantise it first"):
        analyze(str(model), **PATHS[path])


def test_in_memory_int8_parameter_and_storage_precision(tiny_checkpoint, tmp_path):
    module = torch.nn.Linear(4, 3)
    module.weight = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.int8), requires_grad=False)
    source = open_weights(module)
    with pytest.raises(WeightSourceError, match="'weight' .* stored as int8"):
        source.get("weight", dtype=torch.float64)
    with pytest.raises(WeightSourceError, match="'weight' .* stored as int8"):
        source.storage_eps("weight")
    assert source.get("bias").dtype == torch.float32  # float tensors read as before
    double = tmp_path / "double"
    double.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", double)
    save_file({k: v.double() for k, v in load_file(tiny_checkpoint / "model.safetensors").items()},
              double / "model.safetensors")
    with open_weights(str(double)) as src:
        name = next(k for k in src.keys() if k.endswith("q_proj.weight"))
        assert src.storage_eps(name) == torch.finfo(torch.float64).eps > 0


def float8_copy(folder: Path, dest: Path, scale: str = "") -> Path:
    """``folder``'s checkpoint with every projection weight stored as float8_e4m3fn: with ``scale`` (a sibling
    suffix, e.g. ``weight_scale_inv``) the FP8 row-scaled form (stored values = weight / scale, 448 at each row's
    largest entry), without it the weight itself rounded to float8."""
    tensors = {}
    for key, value in load_file(folder / "model.safetensors").items():
        if not key.endswith("proj.weight"):
            tensors[key] = value
        elif scale:
            row = value.float().abs().amax(1) / 448
            tensors[key] = (value.float() / row[:, None]).to(torch.float8_e4m3fn)
            tensors[key.removesuffix("weight") + scale] = row
        else:
            tensors[key] = value.to(torch.float8_e4m3fn)
    dest.mkdir()
    shutil.copy(folder / "config.json", dest)
    save_file(tensors, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("scale", ["weight_scale_inv", "weight_scale", "weight_scale_2", "input_scale", "scales"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_report_path_refuses_float8_weights_with_scales(scale, path, tiny_checkpoint, tmp_path):
    """Review 2 item 2: the stored float8 values are not the weight without their scales (a per-row scale changes
    every geometry value), so the checkpoint is refused with one line naming the tensor and its scale."""
    model = float8_copy(tiny_checkpoint, tmp_path / "fp8", scale)
    with pytest.raises(WeightSourceError, match=rf"tensor '([\w.]+)proj\.weight' of .* is stored as float8_e4m3fn "
                                                rf"with the scale tensor '\1proj\.{scale}' beside it: .* dequantise "
                                                r"it first"):
        analyze(str(model), **PATHS[path])


@pytest.mark.parametrize("stored, named", [("int8", "proj.weight"), ("float8 scaled", "proj.weight_scale_inv")])
def test_cli_exit_2_one_line(stored, named, tiny_checkpoint, tmp_path, capsys):
    """Integer weights and float8 weights with scales: exit 2, one line naming the tensor (and its scale)."""
    model = quantised_copy(tiny_checkpoint, tmp_path / "int8", "int8") if stored == "int8" else \
        float8_copy(tiny_checkpoint, tmp_path / "fp8", "weight_scale_inv")
    assert cli.main(["analyze", str(model)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-flag")]
    assert len(err) == 1 and named in err[0] and "dequantise it first" in err[0]


def test_plain_float8_is_read_at_its_precision(tiny_checkpoint, tmp_path):
    """Float8 storage without scales is the weight itself (rounded): read as stored, at float8_e4m3fn's eps; a
    bfloat16 weight beside an unrelated ``input_scale`` is not a scaled weight."""
    model = float8_copy(tiny_checkpoint, tmp_path / "fp8")
    with open_weights(str(model)) as src:
        name = next(k for k in src.keys() if k.endswith("q_proj.weight"))
        assert src.storage_eps(name) == torch.finfo(torch.float8_e4m3fn).eps == 0.125
        stored = load_file(model / "model.safetensors")[name]
        assert torch.equal(src.get(name, dtype=torch.float64), stored.to(torch.float64))
    for path in ("default", "cheap", "full"):
        report = analyze(str(model), **PATHS[path])
        values = [v for row in report.rows for v in row.values.values() if v is not None]
        assert values and all(math.isfinite(v) for v in values)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.bfloat16), requires_grad=False)
    module.input_scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)
    assert open_weights(module).storage_eps("weight") == torch.finfo(torch.bfloat16).eps

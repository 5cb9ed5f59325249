"""Integer-stored weights (review s5 item 3): bitsandbytes int8 (with its ``SCB`` row scales) and GPTQ/AWQ packed
int4 (``qweight``) hold real values only together with scales hf-flag does not apply, so every report path refuses
them with one line naming the tensor and saying to dequantise first, instead of an internal error or the numbers of
the unscaled integers.  A float checkpoint's storage precision is never 0 (float64: 2.2e-16)."""
from __future__ import annotations

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


def test_cli_exit_2_one_line(tiny_checkpoint, tmp_path, capsys):
    model = quantised_copy(tiny_checkpoint, tmp_path / "int8", "int8")
    assert cli.main(["analyze", str(model)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-flag")]
    assert len(err) == 1 and "proj.weight" in err[0] and "dequantise it first" in err[0]


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

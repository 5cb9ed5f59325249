"""``--max-disk`` in the sweep: a streamed Hub model is analysed in groups of layers, one checkpoint shard at a time,
each group's rows saved as it finishes, so a resumed sweep starts at the first unfinished group and never fetches
the shards of finished groups again.

Groups (:func:`layer_groups`): consecutive layers whose block tensors end in the same checkpoint shard (sorted
file names, the layer order).  Every row of a layer reads only that layer and later ones (block l + 1 for residual and
cross-layer rows, later layers' attention for composition), so a group needs no shard that holds only earlier
layers.  Each group is one layer-shard unit (``DIR/runs/<slug>/streamed/<k>-of-<n>/``, the same markers as
``--split-layers``' shards); the model's report is their merge (:func:`hf_flag.rows.merge_shards`, rows in
analyze's order, summary recomputed), equal to one whole-model run.
"""
from __future__ import annotations

from typing import Any

from hf_flag.harness import schedule
from hf_flag.harness.schedule import RunState


def layer_groups(spec: Any, max_disk: float) -> list[list[int]]:
    """Consecutive layers grouped by the last checkpoint shard their block tensors are in."""
    from hf_flag.harness.sweep import open_source
    from hf_flag.weights.adapters import get_adapter

    with open_source(spec, max_disk) as source:
        keys = source.keys()
        adapter = get_adapter(source.config, keys)
        layout = adapter.layout(source.config, keys)
        last_shard = [max(source.shard_of(t) for t in adapter.block_tensor_names(layout, i))
                      for i in range(layout.n_layers)]
    groups: list[list[int]] = []
    for i, shard in enumerate(last_shard):
        if groups and last_shard[groups[-1][0]] == shard:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def is_streamed(spec: Any, max_disk: float) -> bool:
    """Whether ``spec`` opens as a streamed (sharded Hub safetensors) source under ``--max-disk`` (False when it
    does not open: the whole-model run then records the error)."""
    from hf_flag.harness.sweep import open_source
    from hf_flag.weights.streaming import StreamingHubSource

    try:
        with open_source(spec, max_disk) as source:
            return isinstance(source, StreamingHubSource)
    except Exception:  # noqa: BLE001 - recorded by the run that follows
        return False


def run_streamed(ctx: Any, unit: Any) -> RunState:
    """Run ``unit`` (a whole model) group by group (module docstring); a failure is recorded, never raised."""
    from hf_flag.exits import is_internal
    from hf_flag.harness.sweep import Unit, one_line, run_unit
    from hf_flag.report import Report
    from hf_flag.rows import merge_shards

    cfg, rank = ctx.config, ctx.rank

    try:
        groups = layer_groups(unit.spec, cfg.max_disk)
    except Exception as exc:  # noqa: BLE001 - recorded like any model's failure
        schedule.mark_failed(unit.run_dir, unit.fp, one_line(exc), model=unit.spec.label, rank=rank,
                             internal=is_internal(exc))
        return RunState.FAILED
    parts = [Unit(unit.spec, unit.slug, unit.run_dir / "streamed" / f"{k}-of-{len(groups)}",
                  schedule.fingerprint({"model": unit.fp, "layers": layers}), tuple(layers))
             for k, layers in enumerate(groups)]
    for part in parts:
        state = schedule.run_state(part.run_dir, part.fp)
        if state is not RunState.DONE:
            state = run_unit(ctx, part)
        if state is RunState.FAILED:
            schedule.mark_failed(unit.run_dir, unit.fp, schedule.read_error(part.run_dir), model=unit.spec.label,
                                 shard=list(part.layers), internal=schedule.failed_internally(part.run_dir))
            return RunState.FAILED
    reports = [Report.from_json((p.run_dir / schedule.REPORT).read_text()) for p in parts]
    schedule.mark_done(unit.run_dir, unit.fp, merge_shards(reports).to_json())
    return RunState.DONE

"""Plan a run before paying for it: `simcse-jax plan --config C --topology v5e:4x4 [--max-batch]`.

The planner builds the run's real update step: the config's mesh, the model's shapes (its
`config.json`, or the built-in shapes of the paper's four checkpoints when they are not on this
machine), the same `make_train_step` with the same objective, optimizer and compiler options as
`simcse-jax train`, on abstract arrays (no weights, no data), and compiles it ahead of time for
the topology (`topology.py`: a TPU slice through libtpu, or `cpu:N`). It then reports, per chip:

- memory: parameters and optimizer state (their shards), the batch shard, temporaries
  (activations and scratch), XLA's peak (`memory_analysis()`: arguments + outputs - donated
  aliases + temporaries, the figure the trainer logs) and generated code, against the chip's
  HBM (`roofline.CHIPS`) or `--memory-limit-gib`: the step fits when peak + code <= limit;
- per step: FLOPs and HBM bytes (XLA's `cost_analysis()`), and the collectives with the bytes
  each chip sends (`hlo_collectives.py`);
- the roofline bound (`roofline.py`): step time >= max(compute, HBM, ICI terms), hence an upper
  bound on sentences/s and on MFU.

`--max-batch` searches the largest global batch that fits, over the batches the mesh divides
(multiples of the data-parallel size; with gradient caching, multiples of the chunk), for no
gradient caching and for each `--chunks` size. Each probe is a real compile; the search
interpolates the measured peaks (memory grows about linearly in the batch) and ends with the
answer B compiled and fitting and B + step compiled and not fitting. A compile that the TPU
compiler refuses for lack of memory counts as not fitting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from simcse_jax.config import CONTRASTIVE_IMPLS, TrainConfig, load_config, validate
from simcse_jax.errors import CheckpointError, SimcseError, UsageError
from simcse_jax.planner.roofline import GIB, ChipSpec, chip_by_device_kind, roofline, step_model_flops
from simcse_jax.planner.topology import devices_for, ensure_cpu_devices, parse_topology

if TYPE_CHECKING:  # jax-free at import: the CLI sets libtpu's environment before jax loads
    from simcse_jax.step_builder import StepMemory

MIB = 2**20
# The paper's checkpoints, as their config.json on the Hugging Face Hub gives them, so a plan
# needs no download (fields EncoderConfig reads; the rest do not change the step).
BUILTIN_MODELS: dict[str, dict] = {
    "bert-base-uncased": dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                              type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, hidden_act="gelu"),
    "bert-large-uncased": dict(model_type="bert", vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                               num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512,
                               type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, hidden_act="gelu"),
    "roberta-base": dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                         type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, hidden_act="gelu"),
    "roberta-large": dict(model_type="roberta", vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                          num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                          type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, hidden_act="gelu"),
}


# The settings a plan records beside its figures.
PLAN_CONFIG_KEYS = ("model", "compute_dtype", "global_batch_size", "max_seq_length", "grad_cache_chunk_size", "do_mlm",
                    "mesh_data", "mesh_fsdp", "mesh_tensor", "contrastive_impl", "contrastive_block_size")


class PlanError(SimcseError, RuntimeError):
    """A plan that cannot be made (no model shapes, a compile that failed for another reason than
    memory); the message says why."""


# ----------------------------------------------------------------------------- the step


def model_config(name: str) -> tuple[dict, str]:
    """(Hugging Face config dict, where it came from) for the config's `model`: the trainer's
    resolver (`hf_io.resolve_model_dir`, config.json only), except that a Hub id whose shapes are
    built in here is planned without the network."""
    from simcse_jax.hf_io import read_config, resolve_model_dir

    if name in BUILTIN_MODELS and not Path(name).expanduser().is_dir():
        return dict(BUILTIN_MODELS[name]), f"built-in shapes of {name}"
    try:
        path = resolve_model_dir(name, config_only=True)
    except CheckpointError as e:
        raise PlanError(f"{e} (the planner also knows the shapes of {', '.join(BUILTIN_MODELS)})") from e
    return read_config(path), str(path / "config.json")


def views_per_example(config: TrainConfig) -> tuple[int, str]:
    """(num_sent, why): 2 for .txt and 1-2 column files, 3 for (sent0, sent1, hard_neg) files.
    A .csv/.tsv that is not on this machine is taken as the paper's NLI triples (3)."""
    path = Path(config.train_file).expanduser()
    if path.suffix in (".csv", ".tsv"):
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                header = f.readline().rstrip("\n")
            columns = len(header.split("\t" if "tsv" in path.name else ","))
            return (3 if columns >= 3 else 2), f"{path.name}: {columns} columns"
        return 3, f"{path.name} not here: taken as (sent0, sent1, hard_neg) triples"
    return 2, "one sentence, encoded twice"


@dataclasses.dataclass
class StepSetup:
    build: object  # the train_step.TrainStep (what compile_train_step takes)
    compiler_options: dict | None
    state: object  # abstract TrainState (ShapeDtypeStructs carrying shardings)
    batch: dict
    mesh: object
    encoder_config: object
    model_source: str
    num_sent: int
    num_params: int
    param_bytes: int  # per device
    opt_state_bytes: int
    batch_bytes: int


def _shard_bytes(tree) -> int:
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "sharding") and hasattr(x.dtype, "itemsize"))


def build_step(config: TrainConfig, devices: list, *, layers: int | None = None, num_sent: int | None = None) -> StepSetup:
    """The trainer's update step for `config` on `devices` (`step_builder.build_update_step`,
    the trainer's own construction), with abstract state and batch, compiled by `compile_setup`."""
    import jax

    from simcse_jax.step_builder import abstract_batch, build_update_step, config_mesh

    validate(config, num_devices=len(devices), check_files=False)
    hf, source = model_config(config.model)
    if layers is not None:
        hf = {**hf, "num_hidden_layers": layers}
    # The schedule's length only sets constants inside the step; it changes neither memory nor cost.
    total_steps = config.max_steps if config.max_steps > 0 else 1000
    built = build_update_step(config, hf, config_mesh(config, devices), total_steps=total_steps)
    state = built.sharded_state()
    if num_sent is None:
        num_sent, _ = views_per_example(config)
    batch = abstract_batch(config, built.mesh, num_sent)
    return StepSetup(build=built.step, compiler_options=built.compiler_options, state=state, batch=batch, mesh=built.mesh,
                     encoder_config=built.encoder_config, model_source=source,
                     num_sent=num_sent, num_params=sum(int(x.size) for x in jax.tree.leaves(state.params)),
                     param_bytes=_shard_bytes(state.params), opt_state_bytes=_shard_bytes(state.opt_state),
                     batch_bytes=_shard_bytes(batch))


# ----------------------------------------------------------------------------- the plan


def memory_of(compiled) -> StepMemory:
    """The compiled step's memory per device, as the trainer logs it (`step_builder.StepMemory`)."""
    from simcse_jax.step_builder import StepMemory

    memory = StepMemory.of(compiled)
    if memory is None:
        raise PlanError("this backend's compiler gives no memory analysis")
    return memory


def is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refused_bytes(error: BaseException) -> int | None:
    """What the compiler says a refused program needs, from XLA:TPU's "Ran out of memory in memory
    space hbm. Used 17.28G of 15.75G hbm." or (libtpu 0.0.42) "the total memory required for HLO
    temporaries (42.56G) exceeds available HBM" (binary units; the second counts temporaries
    only); None when the message gives no figure."""
    text = str(error)
    m = (re.search(r"Used ([0-9.]+)([KMGT]?)B? of [0-9.]+[KMGT]?B? hbm", text)
         or re.search(r"total memory required for HLO temporaries \(([0-9.]+)([KMGT]?)B?\) exceeds", text))
    return None if m is None else int(float(m.group(1)) * _UNITS[m.group(2)])


class Refused(int):
    """A probe the compiler refused for lack of memory, carrying the bytes it reported it needed:
    never a fit, but a point the search can interpolate through."""


def compile_setup(setup: StepSetup):
    """(compiled, seconds): through the trainer's own `compile_train_step`."""
    from simcse_jax.step_builder import compile_train_step

    compiled, info = compile_train_step(setup.build, setup.state, setup.batch, setup.compiler_options)
    return compiled, info["compile_seconds"]


def resolve_limit(chip: ChipSpec | None, memory_limit_gib: float | None) -> tuple[int | None, str]:
    if memory_limit_gib is not None:
        return int(memory_limit_gib * GIB), f"--memory-limit-gib {memory_limit_gib:g}"
    if chip is not None:
        return chip.hbm_bytes, f"{chip.name} HBM (published)"
    return None, "no memory limit (pass --memory-limit-gib)"


def make_plan(config: TrainConfig, devices: list, *, layers: int | None = None, num_sent: int | None = None,
              memory_limit_gib: float | None = None, topology: str = "") -> dict:
    """Compiles the step for `devices` and returns the plan as a JSON-able dict."""
    setup = build_step(config, devices, layers=layers, num_sent=num_sent)
    compiled, seconds = compile_setup(setup)
    limit = resolve_limit(chip_by_device_kind(devices[0].device_kind), memory_limit_gib)
    return describe(config, setup, compiled, seconds, limit=limit, topology=topology)


def describe(config: TrainConfig, setup: StepSetup, compiled, seconds: float, *, limit: tuple[int | None, str],
             topology: str) -> dict:
    """The plan of one compiled step (see the module docstring) as a JSON-able dict."""
    from simcse_jax.objective import num_chunks_for
    from simcse_jax.planner.hlo_collectives import collective_traffic, count_collectives
    from simcse_jax.poolers import spec as pooler_spec
    from simcse_jax.sharding import data_parallel_size
    from simcse_jax.train_step import objective_config

    devices = list(setup.mesh.devices.flat)
    mem = memory_of(compiled)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    text = compiled.as_text()
    traffic = collective_traffic(text, len(devices))
    chip = chip_by_device_kind(devices[0].device_kind)
    limit, limit_source = limit
    dp = data_parallel_size(setup.mesh)
    enc = setup.encoder_config
    plan = {
        "config": {k: getattr(config, k) for k in PLAN_CONFIG_KEYS},
        "topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(setup.mesh.shape), "data_parallel": dp, "per_shard_batch": config.global_batch_size // dp,
        "num_sent": setup.num_sent, "layers": enc.num_hidden_layers, "hidden_size": enc.hidden_size,
        "model_source": setup.model_source, "num_params": setup.num_params, "compile_seconds": seconds,
        "memory": {"parameters_bytes": setup.param_bytes, "optimizer_state_bytes": setup.opt_state_bytes,
                   "batch_bytes": setup.batch_bytes, **dataclasses.asdict(mem), "peak_bytes": mem.peak_bytes,
                   "needed_bytes": mem.needed_bytes, "limit_bytes": limit, "limit_source": limit_source,
                   "fits": None if limit is None else mem.needed_bytes <= limit,
                   "margin_bytes": None if limit is None else limit - mem.needed_bytes},
        "flops": float(cost.get("flops", 0.0)), "hbm_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        # XLA's cost analysis counts a loop body once: with gradient caching's loops over chunks
        # the FLOPs and bytes above are lower bounds (the roofline's step time stays a valid,
        # looser, lower bound; no MFU bound). Small fixed loops (threefry's rounds) cost little.
        "grad_cache_chunks": num_chunks_for(objective_config(config), config.global_batch_size, dp),
        "collectives": {**count_collectives(text), **traffic},
        "roofline": None,
    }
    plan["model_flops"] = step_model_flops(
        layers=enc.num_hidden_layers, hidden=enc.hidden_size, intermediate=enc.intermediate_size, vocab=enc.vocab_size,
        seq_len=config.max_seq_length, global_batch=config.global_batch_size, num_sent=setup.num_sent,
        grad_cache=plan["grad_cache_chunks"] > 1, contrastive_impl=config.contrastive_impl, do_mlm=config.do_mlm,
        pooler_mlp=pooler_spec(config.pooler).mlp)
    if chip is not None:
        model_flops_per_chip = plan["model_flops"]["total"] / len(devices)
        r = roofline(plan["flops"], plan["hbm_bytes_accessed"], traffic["total_sent_bytes"], chip, model_flops_per_chip)
        plan["roofline"] = {"chip": dataclasses.asdict(chip), "compute_s": r.compute_s, "model_compute_s": r.model_compute_s,
                            "hbm_s": r.hbm_s, "ici_s": r.ici_s, "step_s": r.step_s, "bound": r.bound,
                            # With loops in the program XLA's HBM bytes are a fraction of the traffic,
                            # so the step may be further from compute-bound than this says.
                            "mfu_bound": None if plan["grad_cache_chunks"] > 1 else r.mfu_bound,
                            "sentences_per_s": r.sentences_per_s(config.global_batch_size)}
    return plan


def _mib(x) -> str:
    return "–" if x is None else f"{x / MIB:,.1f}"


def format_plan(plan: dict) -> str:
    m, c, r = plan["memory"], plan["collectives"], plan["roofline"]
    cfg = plan["config"]
    gc = f", gradient caching in chunks of {cfg['grad_cache_chunk_size']}" if cfg["grad_cache_chunk_size"] else ""
    lines = [
        f"plan: {plan['topology']} ({plan['devices']} x {plan['device_kind']}), mesh "
        + " ".join(f"{k}={v}" for k, v in plan["mesh"].items()) + f", compiled in {plan['compile_seconds']:.1f} s",
        f"  {cfg['model']} ({plan['model_source']}): {plan['layers']} layers, hidden {plan['hidden_size']}, "
        f"{plan['num_params'] / 1e6:.1f} M parameters, {cfg['compute_dtype']} compute",
        f"  global batch {cfg['global_batch_size']} ({plan['per_shard_batch']} per data-parallel shard) x "
        f"{plan['num_sent']} views x {cfg['max_seq_length']} tokens{gc}",
        "",
        "memory per chip                          MiB",
        f"  parameters                      {_mib(m['parameters_bytes']):>12}",
        f"  optimizer state                 {_mib(m['optimizer_state_bytes']):>12}",
        f"  batch                           {_mib(m['batch_bytes']):>12}",
        f"  temporaries (activations, ...)  {_mib(m['temp_bytes']):>12}",
        f"  outputs not donated             {_mib(m['output_bytes'] - m['alias_bytes']):>12}",
        f"  peak (XLA memory analysis)      {_mib(m['peak_bytes']):>12}",
        f"  generated code                  {_mib(m['code_bytes']):>12}",
        f"  limit: {m['limit_source']:<24} {_mib(m['limit_bytes']):>12}",
    ]
    if m["fits"] is not None:
        share = 100 * m["margin_bytes"] / m["limit_bytes"]
        lines.append(f"  fits: {'yes' if m['fits'] else 'NO'}, margin {_mib(m['margin_bytes'])} MiB ({share:.0f} % of the limit)")
    chunks = plan.get("grad_cache_chunks", 1)
    at_least = ">= " if chunks > 1 else ""
    lines += ["", "per chip per step",
              f"  FLOPs (XLA cost analysis)       {at_least}{plan['flops']:.3e}",
              f"  HBM bytes (XLA bytes accessed)  {at_least}{plan['hbm_bytes_accessed']:.3e}",
              "  collectives                     distinct  (HLO instr.)   array MiB    sent MiB"]
    for kind, v in c["per_kind"].items():
        if v["count"] or c["instructions"][kind]:
            lines.append(f"    {kind:<28}  {v['count']:>6}  ({c['instructions'][kind]:>6})     "
                         f"{_mib(v['array_bytes']):>9}   {_mib(v['sent_bytes']):>9}")
    if not any(v["count"] for v in c["per_kind"].values()):
        lines.append("    none")
    if c["unknown_trip_counts"]:
        lines.append(f"    ({c['unknown_trip_counts']} inside loops of unknown trip count, counted once)")
    if r is None:
        lines += ["", f"roofline: no published figures for {plan['device_kind']} (TPU topologies only)"]
    else:
        mf = plan["model_flops"]
        lines += ["", "roofline (step >= max of the terms; each at the chip's peak, perfectly overlapped)",
                  f"  compute {r['compute_s'] * 1e3:8.3f} ms   HBM {r['hbm_s'] * 1e3:8.3f} ms   ICI {r['ici_s'] * 1e3:8.3f} ms",
                  f"  model compute {r['model_compute_s'] * 1e3:8.3f} ms: the model's matmuls, {mf['total']:.3e} FLOPs "
                  f"over all chips (encoder {mf['encoder']:.2e}, contrastive logits {mf['contrastive']:.2e})",
                  f"  step >= {r['step_s'] * 1e3:.3f} ms ({r['bound']}-bound): <= {r['sentences_per_s']:,.0f} sentences/s"
                  + (f", MFU <= {100 * r['mfu_bound']:.0f} %" if r["mfu_bound"] is not None else "")]
        if chunks > 1:
            lines.append(f"  note: XLA's cost analysis counts a loop body once and gradient caching loops over {chunks} "
                         f"chunks: its FLOPs and HBM bytes are lower bounds; the model compute term counts every chunk, "
                         f"and no MFU bound is given (the HBM traffic is unknown)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the largest batch


def search_max_batch(needed_bytes, step: int, limit: int, start: int, *, max_batch: int = 1 << 20, log=None):
    """The largest multiple B of `step` with needed_bytes(B) <= limit (memory taken to grow with
    the batch); `needed_bytes(B)` compiles and returns bytes, or None when the compiler refused
    B for lack of memory (or a `Refused(bytes)` when the compiler said how much it wanted, which
    the interpolation uses). Returns (B or None, {B: bytes, Refused or None} of every probe). The
    search ends with B fitting and B + step probed and not fitting (or B = max_batch)."""
    probes: dict[int, int | None] = {}

    def fits(b: int) -> bool:
        if b not in probes:
            probes[b] = needed_bytes(b)
            if log:
                y = probes[b]
                log(f"  batch {b}: " + ("refused: out of memory" if y is None else
                                        f"refused: out of memory (the compiler wanted {_mib(y)} MiB)" if isinstance(y, Refused)
                                        else f"{_mib(y)} MiB"))
        return probes[b] is not None and not isinstance(probes[b], Refused) and probes[b] <= limit

    def towards_limit(x0: int, x1: int, w0: float = 1.0, w1: float = 1.0) -> int | None:
        """The batch where the line through the probes at x0 and x1 meets the limit, on the grid;
        w0, w1 scale each probe's distance from the limit (Illinois' weights, see below)."""
        y0, y1 = probes.get(x0), probes.get(x1)
        if y0 is None or y1 is None or y1 <= y0 or x1 == x0:
            return None
        f0, f1 = (y0 - limit) * w0, (y1 - limit) * w1
        if f1 == f0:
            return None
        return int((x0 - f0 * (x1 - x0) / (f1 - f0)) // step * step)

    lo, hi = None, None
    b = min(max(step, start // step * step), max_batch // step * step)
    if fits(b):
        lo = b
    else:
        hi = b
    while lo is None:  # shrink until something fits
        if hi <= step:
            return None, probes
        b = max(step, hi // 2 // step * step)
        lo, hi = (b, hi) if fits(b) else (None, b)
    prev = None
    while hi is None:  # grow: extrapolate from the last two fitting probes (at most 4x), else double
        guess = towards_limit(prev, lo) if prev is not None else None
        # A line through two probes of a convex need (the logits grow with the batch squared)
        # overshoots; the cap keeps an early guess from landing far past the answer.
        b = min(max(min(guess or 2 * lo, 4 * lo), lo + step), max_batch // step * step)
        if b <= lo:
            return lo, probes
        if fits(b):
            prev, lo = lo, b
        else:
            hi = b
    moved: list[str] = []
    while hi - lo > step:  # narrow: interpolate between the bracket's ends, else bisect
        # Interpolating a convex need can keep landing on one side of the answer (regula falsi's
        # creep; seen at BERT-base on v5e-16, each probe a few MiB over the limit). The Illinois
        # rule: while the same end keeps moving, halve the other end's weight per repeat, which
        # pulls the next guess across the answer in a step or two instead of bisecting a wide
        # bracket (each probe is a compile of minutes).
        repeats = next((i for i, m in enumerate(reversed(moved)) if m != moved[-1]), len(moved))
        kept = 0.5 ** (repeats - 1) if repeats >= 2 else 1.0
        w_lo, w_hi = (kept, 1.0) if moved and moved[-1] == "hi" else (1.0, kept)
        guess = towards_limit(lo, hi, w_lo, w_hi)
        b = guess if guess is not None else (lo + hi) // 2 // step * step
        b = min(max(b, lo + step), hi - step)
        if fits(b):
            lo = b
            moved.append("lo")
        else:
            hi = b
            moved.append("hi")
    return lo, probes


def plan_max_batch(config: TrainConfig, devices: list, *, chunks: list[int], limit: tuple[int, str], layers=None,
                   num_sent=None, topology: str = "", max_batch: int = 1 << 20, impls: list[str] | None = None,
                   log=None) -> list[dict]:
    """One row per contrastive loss (`impls`, default the config's) and gradient-caching choice
    (0 = off, else the chunk size): the largest batch up to `max_batch` that fits `limit` (bytes
    per chip, where it comes from), verified by compiles at B and B + step, the search starting
    at the config's global batch; `plans` holds the full plan of every probe that compiled."""
    from simcse_jax.sharding import data_parallel_size, make_mesh

    dp = data_parallel_size(make_mesh({"data": config.mesh_data, "fsdp": config.mesh_fsdp, "tensor": config.mesh_tensor},
                                      devices=devices))
    rows = []
    for impl in impls or [config.contrastive_impl]:
        for chunk in chunks:
            row = _max_batch_row(config.replace(contrastive_impl=impl, grad_cache_chunk_size=chunk), devices, dp,
                                 limit=limit, layers=layers, num_sent=num_sent, topology=topology, max_batch=max_batch,
                                 log=log)
            rows.append({"contrastive_impl": impl, **row})
    return rows


def _max_batch_row(config: TrainConfig, devices: list, dp: int, *, limit: tuple[int, str], layers, num_sent,
                   topology: str, max_batch: int, log) -> dict:
    """The search of `plan_max_batch` for one loss and one gradient-caching choice."""
    chunk = config.grad_cache_chunk_size
    step = dp if chunk == 0 else chunk
    if chunk % dp:
        return {"grad_cache_chunk_size": chunk, "error": f"chunk {chunk} is not a multiple of the data-parallel size {dp}"}
    seconds: list[float] = []
    plans: dict[int, dict] = {}

    def needed(b):
        cfg = config.replace(global_batch_size=b)
        try:
            setup = build_step(cfg, devices, layers=layers, num_sent=num_sent)
            t0 = time.perf_counter()
            compiled, _ = compile_setup(setup)
            seconds.append(time.perf_counter() - t0)
            plans[b] = describe(cfg, setup, compiled, seconds[-1], limit=limit, topology=topology)
            return plans[b]["memory"]["needed_bytes"]
        except Exception as e:
            if is_out_of_memory(e):
                wanted = refused_bytes(e)
                if wanted is not None and "HLO temporaries" in str(e):  # + what the arguments hold
                    wanted += setup.param_bytes + setup.opt_state_bytes + setup.batch_bytes
                return None if wanted is None else Refused(wanted)
            raise PlanError(f"batch {b}, chunk {chunk}, {config.contrastive_impl} loss: compile failed "
                            f"({type(e).__name__}: {str(e)[:500]})") from e

    if log:
        what = "no gradient caching" if chunk == 0 else f"gradient caching, chunk {chunk}"
        log(f"max batch, {config.contrastive_impl} loss, {what} (candidates: multiples of {step}):")
    best, probes = search_max_batch(needed, step, limit[0], max(config.global_batch_size, step), max_batch=max_batch, log=log)
    return {"grad_cache_chunk_size": chunk, "step": step, "max_global_batch": best,
                 "needed_bytes": None if best is None else probes[best],
                 "next_batch": None if best is None else best + step,
                 "next_needed_bytes": None if best is None or isinstance(probes.get(best + step), Refused) else probes.get(best + step),
                 "limit_bytes": limit[0],
                 "probes": {str(k): None if isinstance(v, Refused) else v for k, v in sorted(probes.items())},
                 "refused_wanted_bytes": {str(k): int(v) for k, v in sorted(probes.items()) if isinstance(v, Refused)},
                 "compile_seconds": round(sum(seconds), 1), "plans": {str(k): v for k, v in sorted(plans.items())}}


def format_max_batch(rows: list[dict], limit_source: str) -> str:
    lines = [f"largest global batch per contrastive loss and gradient-caching choice (limit: {limit_source})",
             "  loss        grad cache chunk   max batch   needed MiB   next batch   next needed MiB   compiles"]
    for r in rows:
        impl = r.get("contrastive_impl", "?")
        if "error" in r:
            lines.append(f"  {impl:<10}  {r['grad_cache_chunk_size']:>16}   {r['error']}")
            continue
        chunk = "off" if r["grad_cache_chunk_size"] == 0 else str(r["grad_cache_chunk_size"])
        nb = str(r["next_batch"])
        if r["max_global_batch"] is None or r["next_needed_bytes"] is not None:
            nxt = _mib(r["next_needed_bytes"])
        elif nb in r.get("refused_wanted_bytes", {}):
            nxt = f"OOM ({_mib(r['refused_wanted_bytes'][nb])})"
        elif nb in r["probes"]:
            nxt = "OOM"
        else:
            nxt = "not tried (upto)"
        lines.append(f"  {impl:<10}  {chunk:>16}   {str(r['max_global_batch'] or 'none'):>9}   {_mib(r['needed_bytes']):>10}   "
                     f"{str(r['next_batch'] or '–'):>10}   {nxt:>15}   {len(r['probes']):>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="compile the run's update step for a topology: memory, FLOPs, collectives, roofline")
    p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--topology", required=True, help="v5e:4x4, v5e-16, v4-8, v5p:2x2x1, ... or cpu:N (N simulated CPU devices)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set global_batch_size=512")
    p.add_argument("--layers", type=int, default=None, help="encoder layers instead of the model's (fast what-ifs)")
    p.add_argument("--num-sent", type=int, default=None, choices=(2, 3), help="views per example (default: from train_file)")
    p.add_argument("--memory-limit-gib", type=float, default=None, help="per-chip limit instead of the chip's HBM")
    p.add_argument("--max-batch", action="store_true", help="search the largest global batch that fits")
    p.add_argument("--max-batch-upto", type=int, default=1 << 20, metavar="N",
                   help="with --max-batch: the largest global batch to consider (default 1,048,576); the search starts "
                        "at the config's global_batch_size, so a known bracket costs few compiles")
    p.add_argument("--chunks", default="0", metavar="C1,C2,...",
                   help="with --max-batch: gradient-caching chunk sizes to search, 0 = no caching (default: 0), e.g. 0,1024")
    p.add_argument("--impls", default=None, metavar="I1,I2,...",
                   help="with --max-batch: contrastive losses to search (dense, blockwise, ring; default: the config's "
                        "contrastive_impl), e.g. dense,ring")
    p.add_argument("--libtpu-path", default=None,
                   help="folder holding the libtpu package (else $SIMCSE_LIBTPU_PATH, else the installed `plan` extra)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan (and max-batch rows) as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Errors (SimcseError) go to cli.main, the one place that turns them into a message and a code.
    kind, canonical = parse_topology(args.topology)
    if kind == "cpu":
        ensure_cpu_devices(int(canonical.split(":")[1]))
    else:
        # An executable compiled for TPU devices this machine does not have can never be loaded
        # here ("PjRtCompiler must be constructed with a Client"): caching it would only put
        # hundreds of MB of dead entries into the persistent cache and a warning into every run.
        import jax

        jax.config.update("jax_enable_compilation_cache", False)
    config = load_config(args.config, args.overrides)
    devices = devices_for(canonical, libtpu_path=args.libtpu_path)
    limit = resolve_limit(chip_by_device_kind(devices[0].device_kind), args.memory_limit_gib)
    if args.max_batch:
        if limit[0] is None:
            raise UsageError(f"--max-batch on {canonical}: {limit[1]}")
        if args.max_batch_upto < 1:
            raise UsageError(f"--max-batch-upto {args.max_batch_upto}: expected a positive global batch size")
        try:
            chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
        except ValueError:
            raise UsageError(f"--chunks {args.chunks!r}: expected sizes like 0,512 (0 = no gradient caching)") from None
        impls = None if args.impls is None else [i.strip() for i in args.impls.split(",") if i.strip()]
        for impl in impls or []:
            if impl not in CONTRASTIVE_IMPLS:
                raise UsageError(f"--impls {args.impls}: {impl!r} is not a contrastive loss; choose from {', '.join(CONTRASTIVE_IMPLS)}")
        rows = plan_max_batch(config, devices, chunks=chunks, limit=limit, layers=args.layers, num_sent=args.num_sent,
                              topology=canonical, max_batch=args.max_batch_upto, impls=impls,
                              log=lambda s: print(s, file=sys.stderr, flush=True))
        for row in rows:  # the full table at each answer, from the compile that verified it
            if row.get("max_global_batch"):
                print(format_plan(row["plans"][str(row["max_global_batch"])]) + "\n")
        print(format_max_batch(rows, limit[1]))
        result = {"max_batch": rows}
    else:
        try:
            result = make_plan(config, devices, layers=args.layers, num_sent=args.num_sent,
                               memory_limit_gib=args.memory_limit_gib, topology=canonical)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            # XLA:TPU refuses a program larger than HBM at compile time: that is the answer.
            message = (f"does not fit: the compiler for {canonical} ran out of memory at global batch "
                       f"{config.global_batch_size}:\n{str(e)[:1500]}\n(--max-batch finds the largest batch that fits)")
            print(message)
            if args.json:  # a sweep's record of the refusal (studies/sweep.py reads it as "does not fit")
                _write_json(args.json, refused_plan(config, canonical, limit, e, message))
            return 1
        print(format_plan(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def refused_plan(config: TrainConfig, topology: str, limit: tuple[int | None, str], error: BaseException,
                 message: str) -> dict:
    """The plan of a step the compiler refused for lack of memory: no peak (nothing was compiled),
    what the compiler said it needed when it said so, and the limit it was held to."""
    wanted = refused_bytes(error)
    return {"config": {k: getattr(config, k) for k in PLAN_CONFIG_KEYS}, "topology": topology,
            "memory": {"fits": False, "peak_bytes": None, "needed_bytes": wanted, "limit_bytes": limit[0],
                       "limit_source": limit[1]},
            "refused": message, "roofline": None}


def _write_json(path: str, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")

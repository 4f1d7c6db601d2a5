"""`simcse-jax plan`: the planner compiles the trainer's own step, its max-batch search brackets
the answer by real compiles, the roofline and the collective byte counts follow their formulas."""

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from simcse_jax import train as train_lib
from simcse_jax.config import TrainConfig
from simcse_jax.planner.hlo_collectives import collective_traffic, count_collectives
from simcse_jax.planner.plan import (
    Refused,
    build_step,
    compile_setup,
    format_max_batch,
    make_plan,
    memory_of,
    plan_max_batch,
    refused_bytes,
    refused_plan,
    search_max_batch,
)
from simcse_jax.planner.roofline import CHIPS, ChipSpec, roofline, step_model_flops
from simcse_jax.planner.topology import LIBTPU_ENV, TopologyError, devices_for, parse_topology


def tiny(model_dir, tmp_path, **changes) -> TrainConfig:
    # A real one-sentence-per-line sample (../shared): the planner reads its kind, the trainer its rows.
    sample = Path(__file__).resolve().parents[1].parent / "shared/data/train_samples/wiki1m_for_simcse.head11914.txt"
    base = TrainConfig(model=str(model_dir), compute_dtype="float32", train_file=str(sample),
                       data_cache_dir=str(tmp_path / "cache"), max_seq_length=16, global_batch_size=16, max_steps=1,
                       eval_steps=100, log_every=1, sts_dir=None, do_export=False, do_test_eval=False)
    return base.replace(**changes)


class StopAfterFirstStep(Exception):
    pass


@pytest.mark.slow  # a trainer run (tokenizes 12k sentences) and a planner compile: 30-120 s on 2 busy cores
@pytest.mark.parametrize("changes", [
    {},
    pytest.param({"mesh_data": 4, "mesh_fsdp": 2, "grad_cache_chunk_size": 8}, marks=pytest.mark.slow),
], ids=["data8", "data4-fsdp2-gradcache"])
def test_plan_memory_equals_the_trainers_compiled_step(tiny_model_dir, tmp_path, monkeypatch, changes):
    config = tiny(tiny_model_dir, tmp_path, **changes)
    seen = {}
    trainer_compile = train_lib.compile_train_step

    def recording_compile(step, state, batch, options=None, **kwargs):  # the trainer's own compile, observed
        compiled, info = trainer_compile(step, state, batch, options, **kwargs)
        seen["memory"] = memory_of(compiled)
        seen["batch_shape"] = batch["input_ids"].shape
        return compiled, info

    def stop(event, step):
        raise StopAfterFirstStep

    monkeypatch.setattr(train_lib, "compile_train_step", recording_compile)
    with pytest.raises(StopAfterFirstStep):
        train_lib.train(config, tmp_path / "run", progress=False, callback=stop)

    plan = make_plan(config, jax.devices()[:8], topology="cpu:8")
    m = plan["memory"]
    assert (plan["config"]["global_batch_size"], plan["num_sent"], config.max_seq_length) == seen["batch_shape"]
    trainer = seen["memory"]
    assert (m["argument_bytes"], m["output_bytes"], m["alias_bytes"], m["temp_bytes"]) == (
        trainer.argument_bytes, trainer.output_bytes, trainer.alias_bytes, trainer.temp_bytes)
    assert m["peak_bytes"] == trainer.peak_bytes
    # The donated state aliases its outputs; parameters + optimizer state are inside the arguments.
    assert m["alias_bytes"] > 0 and m["parameters_bytes"] + m["optimizer_state_bytes"] <= m["argument_bytes"]
    assert plan["flops"] > 0 and plan["collectives"]["per_kind"]["all-reduce"]["count"] > 0
    # Gradient caching loops over chunks (16 rows / 8 per chunk): the plan marks its cost figures as
    # lower bounds (test_xla_cost_analysis_counts_a_loop_body_once says why).
    assert plan["grad_cache_chunks"] == (2 if config.grad_cache_chunk_size else 1)


@pytest.mark.slow  # ~8 compiles: 40-120 s on the 2-core CI machine
def test_max_batch_fits_and_the_next_candidate_does_not(tiny_model_dir, tmp_path):
    config = tiny(tiny_model_dir, tmp_path, max_seq_length=8)
    devices = jax.devices()[:8]

    def needed(batch):
        setup = build_step(config.replace(global_batch_size=batch), devices, layers=1)
        return memory_of(compile_setup(setup)[0]).needed_bytes

    # An artificial per-device limit between the needs of batch 16 and batch 64.
    limit = (needed(16) + needed(64)) // 2
    (row,) = plan_max_batch(config, devices, chunks=[0], limit=(limit, "test"), layers=1)
    best, step = row["max_global_batch"], row["step"]
    assert step == 8 and best % step == 0 and 16 <= best < 64
    # Both ends were compiled: the answer within the limit, the next candidate above it.
    assert row["needed_bytes"] <= limit < row["next_needed_bytes"]
    assert row["plans"][str(best)]["memory"]["fits"] and not row["plans"][str(best + step)]["memory"]["fits"]
    assert needed(best + step) == row["next_needed_bytes"]  # the search's probe is the plain compile's figure


@pytest.mark.slow  # ~10 small compiles: 1-2 min on the 2-core CI machine
def test_max_batch_searches_over_the_contrastive_loss(tiny_model_dir, tmp_path):
    """--impls dense,ring: under a limit that the dense loss's B/n x B logits exceed at batch 4096,
    the ring loss (linear in B) still fits 4096 while dense stops below it."""
    config = tiny(tiny_model_dir, tmp_path, max_seq_length=8, grad_cache_chunk_size=512, contrastive_block_size=16)
    devices = jax.devices()[:8]

    def needed(impl, batch):
        setup = build_step(config.replace(contrastive_impl=impl, global_batch_size=batch), devices, layers=1)
        return memory_of(compile_setup(setup)[0]).needed_bytes

    ring, dense = needed("ring", 4096), needed("dense", 4096)
    assert ring < 0.9 * dense, (ring, dense)
    limit = (ring + dense) // 2
    rows = plan_max_batch(config.replace(global_batch_size=2048), devices, chunks=[512], limit=(limit, "test"), layers=1,
                          max_batch=4096, impls=["dense", "ring"])
    by_impl = {r["contrastive_impl"]: r for r in rows}
    assert by_impl["ring"]["max_global_batch"] == 4096 and by_impl["ring"]["needed_bytes"] == ring
    assert by_impl["dense"]["max_global_batch"] < 4096 and by_impl["dense"]["next_needed_bytes"] > limit
    assert all(r["plans"][str(r["max_global_batch"])]["config"]["contrastive_impl"] == r["contrastive_impl"] for r in rows)
    text = format_max_batch(rows, "test")
    assert "ring" in text and "dense" in text


def test_impls_outside_the_known_losses_are_refused_naming_the_flag(capsys):
    from simcse_jax import cli

    assert cli.main(["plan", "--config", "configs/demo_cpu.py", "--topology", "cpu:8", "--max-batch",
                     "--memory-limit-gib", "1", "--impls", "dense,flash"]) == 2
    assert "--impls dense,flash: 'flash' is not a contrastive loss; choose from dense, blockwise, ring" in capsys.readouterr().err


def test_max_batch_search_brackets_on_the_grid_and_handles_refused_compiles():
    calls = []

    def needed(b):  # memory = 100 + 3 b bytes; the "compiler" refuses batches from 600 on
        calls.append(b)
        return None if b >= 600 else 100 + 3 * b

    for limit, expected in ((1000, 296), (1900, 592), (50, None), (124, 8)):
        calls.clear()
        best, probes = search_max_batch(needed, 8, limit, start=64)
        assert best == expected, (limit, probes)
        if best is not None:
            assert probes[best] <= limit and (probes[best + 8] is None or probes[best + 8] > limit)
        assert len(calls) == len(set(calls)) <= 12


def test_refused_compiles_report_what_they_wanted_and_the_search_interpolates_through_them():
    # XLA:TPU's refusal (binary units), as libtpu words it.
    err = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                       "Used 17.28G of 15.75G hbm. Exceeded hbm capacity by 1.53G.")
    assert refused_bytes(err) == int(17.28 * 2**30)
    # libtpu 0.0.42 (jax 0.10.2) words it so (seen at BERT-base, batch 65536, v5e:2x2): temporaries only.
    assert refused_bytes(RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                      "HLO temporaries (42.56G) exceeds available HBM (15.75G).")) == int(42.56 * 2**30)
    assert refused_bytes(RuntimeError("RESOURCE_EXHAUSTED: out of memory")) is None
    assert refused_bytes(RuntimeError("Ran out of memory in memory space hbm. Used 900.5M of 1.00G hbm.")) == int(900.5 * 2**20)

    def search(needed, limit, start, **kw):
        calls = []

        def probe(b):
            calls.append(b)
            return needed(b)

        best, probes = search_max_batch(probe, 16, limit, start=start, **kw)
        return best, probes, calls

    # A convex (quadratic) need, like the logits of a gradient-cached global batch; the compiler
    # refuses above its own capacity (1.05x the limit) but says how much it wanted.
    limit = 10_000_000

    def convex(b):
        y = 3_000_000 + b * b // 3
        return Refused(y) if y > 1.05 * limit else y

    best, probes, calls = search(convex, limit, start=512)
    exact = max(b for b in range(16, 10_000, 16) if 3_000_000 + b * b // 3 <= limit)
    assert best == exact and isinstance(probes[best + 16], int) and not 3_000_000 + (best + 16) ** 2 // 3 <= limit
    assert len(calls) == len(set(calls)) <= 9, calls
    # With no figure from the compiler, the same search bisects and still brackets exactly.
    best_blind, _, calls_blind = search(lambda b: None if isinstance(convex(b), Refused) else convex(b), limit, start=512)
    assert best_blind == exact and len(calls_blind) >= len(calls)
    # --max-batch-upto: a known bracket [start, upto] costs a handful of compiles.
    best, probes, calls = search(convex, limit, start=exact - 32, max_batch=exact + 64)
    assert best == exact and len(calls) <= 4, calls
    # Regula falsi's creep on a measured curve (BERT-base, v5e-16, ring loss, chunk 512: MiB per chip at
    # the batches the search probed there): the Illinois weights cross the answer without bisecting.
    measured = {1048576: 5551.9, 2097152: 9117.1, 2900480: 12387.5, 3704320: 15265.3, 3712000: 15287.2, 3903488: 15986.0}
    xs = sorted(measured)
    curve = lambda b: int(np.interp(b, xs, [measured[x] * 2**20 for x in xs]))  # noqa: E731
    v5e = int(15258.8 * 2**20)
    best, probes = search_max_batch(curve, 512, v5e, start=1048576, max_batch=1 << 23)
    assert best == max(b for b in range(512, 4_000_000, 512) if curve(b) <= v5e) and len(probes) <= 8
    best, probes, calls = search(convex, limit, start=512, max_batch=1024)
    assert best == 1024 and 1040 not in probes  # the cap is the answer; nothing above it was compiled


def test_a_refused_plan_records_the_refusal_for_the_sweep(tmp_path):
    """What `plan --json` writes when the TPU compiler refuses the step: no peak, what the compiler
    said it wanted, the limit; studies/sweep.py reads it as "does not fit"."""
    config = tiny(tmp_path, tmp_path, global_batch_size=131584, contrastive_impl="dense")
    err = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 17.28G of 15.75G hbm.")
    record = refused_plan(config, "v5e:4x4", (CHIPS["v5e"].hbm_bytes, "v5e HBM (published)"), err, "does not fit: ...")
    assert record["memory"] == {"fits": False, "peak_bytes": None, "needed_bytes": int(17.28 * 2**30),
                                "limit_bytes": CHIPS["v5e"].hbm_bytes, "limit_source": "v5e HBM (published)"}
    assert record["config"]["global_batch_size"] == 131584 and record["config"]["contrastive_impl"] == "dense"
    assert record["topology"] == "v5e:4x4" and record["refused"] == "does not fit: ..." and record["roofline"] is None


def test_xla_cost_analysis_counts_a_loop_body_once():
    """Why a gradient-cached plan's FLOPs are lower bounds: ten trips of a matmul cost one. If a
    jax release starts counting trips, this fails and the plan's note can go."""
    x = jnp.ones((64, 64))

    def flops(f):
        cost = jax.jit(f).lower(x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    one = flops(lambda y: y @ x)
    assert one == 2 * 64**3
    assert flops(lambda y: jax.lax.fori_loop(0, 10, lambda i, z: z @ x, y)) == pytest.approx(one, rel=1e-3)  # not 10x


def _bert_shapes(folder: Path) -> Path:
    """config.json of a random BERT whose matmuls dominate (a small vocabulary: its Adam update
    would otherwise weigh like the encoder); the planner needs the shapes only."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 1000, "hidden_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512, "max_position_embeddings": 64,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}))
    return folder


def test_model_flops_match_xla_without_loops_and_count_what_xla_misses_in_them(tmp_path):
    """The roofline's model-compute term: on a step without loops XLA's FLOPs (all chips) are the
    model's matmuls plus a little elementwise work; with gradient caching and the ring loss XLA
    counts each loop body once and falls far below what the step must compute."""
    config = tiny(_bert_shapes(tmp_path / "bert"), tmp_path, max_seq_length=32, global_batch_size=64, cpu_onednn=False)
    devices = jax.devices()[:8]
    plain = make_plan(config, devices, topology="cpu:8")
    model, xla = plain["model_flops"], plain["flops"] * len(devices)
    assert model["total"] <= xla <= 1.25 * model["total"], (xla, model)
    looped = make_plan(config.replace(grad_cache_chunk_size=16, contrastive_impl="ring", contrastive_block_size=8),
                       devices, topology="cpu:8")
    assert looped["grad_cache_chunks"] > 1
    # One more encoder pass (gradient caching's first), one more logits pass (the ring's recompute).
    assert looped["model_flops"]["encoder"] == pytest.approx(4 / 3 * model["encoder"])
    assert looped["model_flops"]["contrastive"] == pytest.approx(4 / 3 * model["contrastive"])
    assert looped["flops"] * len(devices) < 0.5 * looped["model_flops"]["total"]


def test_model_flops_by_hand():
    # BERT-base shapes, batch 1024 sentence pairs of 32 tokens, dense loss, no caching, the MLP pooler.
    f = step_model_flops(layers=12, hidden=768, intermediate=3072, vocab=30522, seq_len=32, global_batch=1024,
                         num_sent=2, grad_cache=False, contrastive_impl="dense", do_mlm=False, pooler_mlp=True)
    per_token_forward = 12 * (8 * 768**2 + 4 * 768 * 3072 + 4 * 32 * 768)  # 2 FLOPs per multiply-add
    assert f["encoder"] == 3 * 1024 * 2 * 32 * per_token_forward
    assert f["contrastive"] == 3 * 2 * 1024 * 1024 * 768
    assert f["total"] == f["encoder"] + f["pooler"] + f["contrastive"]
    # A million-sentence ring batch: the logits grow with B^2 (and the ring recomputes them), the
    # encoder with B (and gradient caching's first pass).
    big = step_model_flops(layers=12, hidden=768, intermediate=3072, vocab=30522, seq_len=32, global_batch=1 << 20,
                           num_sent=2, grad_cache=True, contrastive_impl="ring", do_mlm=False, pooler_mlp=True)
    assert big["contrastive"] == f["contrastive"] * 1024**2 * 4 / 3
    assert big["encoder"] == f["encoder"] * 1024 * 4 / 3


def test_roofline_by_hand():
    chip = ChipSpec("test", "test chip", hbm_bytes=16 * 2**30, peak_flops_per_s=1e14, hbm_bytes_per_s=1e12,
                    ici_bytes_per_s=1e11)
    # compute 5e11 / 1e14 = 5 ms, HBM 8e9 / 1e12 = 8 ms, ICI 2e8 / 1e11 = 2 ms -> 8 ms, HBM-bound.
    r = roofline(flops=5e11, hbm_bytes=8e9, ici_bytes=2e8, chip=chip)
    assert (r.compute_s, r.hbm_s, r.ici_s) == pytest.approx((5e-3, 8e-3, 2e-3))
    assert r.step_s == pytest.approx(8e-3) and r.bound == "HBM"
    assert r.mfu_bound == pytest.approx(5 / 8)
    assert r.sentences_per_s(512) == pytest.approx(512 / 8e-3)
    r = roofline(flops=5e11, hbm_bytes=1e9, ici_bytes=9e8, chip=chip)  # ICI 9 ms
    assert r.bound == "ICI" and r.step_s == pytest.approx(9e-3)
    # The model's FLOPs (12e11: 12 ms) count where XLA's loop-counted FLOPs (5 ms) do not.
    r = roofline(flops=5e11, hbm_bytes=8e9, ici_bytes=2e8, chip=chip, model_flops=12e11)
    assert r.bound == "model compute" and r.step_s == pytest.approx(12e-3) and r.mfu_bound == 1.0
    assert CHIPS["v5e"].peak_flops_per_s == 197e12 and CHIPS["v5e"].device_kind == "TPU v5 lite"


def test_collective_bytes_of_a_compiled_all_reduce_and_all_gather():
    devices = np.array(jax.devices()[:8])
    mesh = jax.sharding.Mesh(devices, ("d",))
    n = 1024

    @jax.jit
    def f(x):  # x rows sharded over d: the sum over rows all-reduces [n] floats; x.T all-gathers x
        return jnp.sum(x, axis=0), jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh, P()))

    x = jax.device_put(jnp.ones((8 * 4, n), jnp.float32), NamedSharding(mesh, P("d")))
    text = f.lower(x).compile().as_text()
    counts = count_collectives(text)
    traffic = collective_traffic(text, 8)["per_kind"]
    assert counts["distinct"]["all-reduce"] >= 1 and counts["distinct"]["all-gather"] >= 1
    # The all-gather's full array is the replicated [32, n] float32 result.
    assert traffic["all-gather"]["array_bytes"] == 32 * n * 4
    assert traffic["all-gather"]["sent_bytes"] == pytest.approx(7 / 8 * 32 * n * 4)
    assert traffic["all-reduce"]["sent_bytes"] == pytest.approx(2 * 7 / 8 * traffic["all-reduce"]["array_bytes"])
    assert traffic["all-reduce"]["array_bytes"] >= n * 4


def test_a_collective_inside_a_loop_counts_once_per_trip():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("d",))
    n, trips = 1024, 4

    @jax.jit
    def f(x):  # a scan over `trips` chunks of rows sharded over d: each trip all-reduces [n] floats
        return jax.lax.scan(lambda c, xi: (c + jnp.sum(jnp.sin(xi) * c, axis=0), None), jnp.ones((n,)), x)[0]

    x = jax.device_put(jnp.ones((trips, 32, n)), NamedSharding(mesh, P(None, "d")))
    text = f.lower(x).compile().as_text()
    assert "while(" in text and count_collectives(text)["distinct"]["all-reduce"] == 1
    traffic = collective_traffic(text, 8)
    assert traffic["per_kind"]["all-reduce"]["count"] == trips and traffic["unknown_trip_counts"] == 0
    assert traffic["per_kind"]["all-reduce"]["array_bytes"] == trips * n * 4


def test_topology_names():
    assert parse_topology("v5e-16") == ("tpu", "v5e:4x4")
    assert parse_topology("v4-8") == ("tpu", "v4:2x2x1")  # 8 TensorCores = 4 chips
    assert parse_topology("v5p-8") == ("tpu", "v5p:2x2x1")
    assert parse_topology("v5e:8x8") == ("tpu", "v5e:8x8")
    assert parse_topology("cpu:8") == ("cpu", "cpu:8")
    with pytest.raises(TopologyError, match="v5e:4x4"):
        parse_topology("tpu-16")
    with pytest.raises(TopologyError, match="has 8 CPU devices"):
        devices_for("cpu:64")


def test_a_folder_without_libtpu_is_refused_with_the_install_command(tmp_path):
    with pytest.raises(TopologyError, match=r"holds no libtpu package.*pip install 'simcse-jax\[plan\]'.*libtpu=="):
        devices_for("v5e:2x2", libtpu_path=str(tmp_path))


def _libtpu_available() -> bool:
    path = os.environ.get(LIBTPU_ENV)
    return bool(path and os.path.isdir(os.path.join(path, "libtpu"))) or importlib.util.find_spec("libtpu") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _libtpu_available(), reason=(
    "libtpu is not installed: the TPU compile needs the `plan` extra (pip install -e '.[plan]', a 213 MB wheel, kept "
    f"out of CI's default install) or a folder in ${LIBTPU_ENV} (pip install --no-deps --target DIR 'libtpu==<jax's pin>')"))
def test_two_layer_model_plans_on_v5e_2x2(tmp_path):
    config = TrainConfig(model="bert-base-uncased", compute_dtype="bfloat16", train_file="data/wiki1m_for_simcse.txt",
                         max_seq_length=32, global_batch_size=64, mlp_only_train=True)
    plan = make_plan(config, devices_for("v5e:2x2"), layers=2, topology="v5e:2x2")
    assert plan["devices"] == 4 and plan["device_kind"] == "TPU v5 lite" and plan["layers"] == 2
    assert plan["memory"]["fits"] and plan["memory"]["limit_bytes"] == CHIPS["v5e"].hbm_bytes
    assert plan["collectives"]["per_kind"]["all-reduce"]["count"] > 0 and plan["collectives"]["total_sent_bytes"] > 0
    assert plan["roofline"]["step_s"] > 0 and 0 < plan["roofline"]["mfu_bound"] <= 1


@pytest.mark.slow  # two `simcse-jax plan` subprocesses (~15-40 s each on the 2-core CI machine)
def test_sweep_plan_writes_a_plan_per_point_and_the_report_shows_planned_next_to_measured(tiny_model_dir, tmp_path, capsys):
    import json

    from simcse_jax import cli

    workdir = tmp_path / "sw"
    rc = cli.main(["sweep", "--config", "configs/demo_cpu.py", "--workdir", str(workdir), "--grid", "global_batch_size=16,32",
                   "--set", f"model={tiny_model_dir}", "--set", "max_seq_length=16", "--plan", "--topology", "cpu:8",
                   "--plan-args", "--layers 1 --memory-limit-gib 4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    plans = {b: json.loads((workdir / f"global_batch_size={b}" / "plan.json").read_text()) for b in (16, 32)}
    assert [p["config"]["global_batch_size"] for p in plans.values()] == [16, 32]
    assert plans[32]["memory"]["peak_bytes"] > plans[16]["memory"]["peak_bytes"] and plans[16]["memory"]["fits"]
    assert "fits" in out and not any((workdir / f"global_batch_size={b}" / "results.json").exists() for b in (16, 32))
    # One point trained since (its results.json as the trainer writes it): planned beside measured.
    (workdir / "global_batch_size=16" / "results.json").write_text(json.dumps(
        {"status": "completed", "steps": 5, "global_batch_size": 16, "devices": 8, "sentences_per_s": 40.0,
         "step_peak_memory_mib": 30.0}))
    assert cli.main(["report", str(workdir)]) == 0
    table = capsys.readouterr().out
    assert "planned peak MiB/device" in table and "planned for" in table and "cpu:8" in table
    report = json.loads((workdir / "report" / "report.json").read_text())
    rows = {r["global_batch"]: r for r in report["runs"]}
    assert rows[16]["peak_memory_mib"] == 30.0 and rows[16]["status"] == "completed"
    for b in (16, 32):
        assert rows[b]["planned_peak_memory_mib"] == pytest.approx(plans[b]["memory"]["peak_bytes"] / 2**20)

"""Configs are data: every paper setting builds on an 8-device mesh, bad values name their key."""

from pathlib import Path

import jax
import pytest
import transformers
from flax import nnx

from simcse_jax.config import TrainConfig, apply_overrides, load_config, validate
from simcse_jax.encoder import Encoder, EncoderConfig
from simcse_jax.errors import ConfigError
from simcse_jax.sharding import data_parallel_size, make_mesh, param_partition_specs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The architectures of the released settings' base models (their public config.json values),
# built without a download.
ARCHITECTURES = {
    "bert-base-uncased": transformers.BertConfig(),
    "bert-large-uncased": transformers.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                  intermediate_size=4096),
    "roberta-base": transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                               layer_norm_eps=1e-5, pad_token_id=1),
    "roberta-large": transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                                layer_norm_eps=1e-5, pad_token_id=1, hidden_size=1024,
                                                num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
PAPER_SETTINGS = [f"{f}:{m}{x}" for f in ("unsup_simcse.py", "sup_simcse.py") for m in ARCHITECTURES for x in ("", "+mlm")]
REFERENCE_BATCH_LR = {  # the reference README's table: (batch, lr)
    "unsup_simcse.py:bert-base-uncased": (64, 3e-5), "unsup_simcse.py:bert-large-uncased": (64, 1e-5),
    "unsup_simcse.py:roberta-base": (512, 1e-5), "unsup_simcse.py:roberta-large": (512, 3e-5),
    "sup_simcse.py:bert-base-uncased": (512, 5e-5), "sup_simcse.py:bert-large-uncased": (512, 1e-5),
    "sup_simcse.py:roberta-base": (512, 5e-5), "sup_simcse.py:roberta-large": (512, 1e-5),
}


@pytest.mark.parametrize("setting", PAPER_SETTINGS)
def test_paper_config_builds_abstractly_on_8_devices(setting):
    config = load_config(str(CONFIGS / setting))
    name = setting.split("+")[0]
    if name in REFERENCE_BATCH_LR:
        assert (config.global_batch_size, config.learning_rate) == REFERENCE_BATCH_LR[name]
    assert config.max_seq_length == 32 and config.temperature == 0.05 and config.eval_steps == 125
    assert config.mlp_only_train == setting.startswith("unsup") and config.pooler == "cls"
    assert config.do_mlm == setting.endswith("+mlm")
    assert config.contrastive_impl == "dense"  # the reference's numerics
    validate(config, num_devices=jax.device_count(), check_files=False)
    mesh = make_mesh({"data": config.mesh_data, "fsdp": config.mesh_fsdp, "tensor": config.mesh_tensor})
    assert config.global_batch_size % data_parallel_size(mesh) == 0
    hf = ARCHITECTURES[config.model].to_dict()
    cfg = EncoderConfig.from_hf_dict(hf, compute_dtype=config.compute_dtype, with_mlm_head=config.do_mlm)
    abstract = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    specs = param_partition_specs(state, mesh)
    assert len(jax.tree.leaves(specs)) == len(jax.tree.leaves(state))
    # Also on a sharded mesh with every axis in use.
    param_partition_specs(state, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))


def test_demo_config_and_overrides_are_typed():
    config = load_config(str(CONFIGS / "demo_cpu.py"), ["learning_rate=1e-4", "shuffle=false", "sts_dir=none",
                                                        "hidden_dropout_prob=0.0"])
    assert config.learning_rate == 1e-4 and config.shuffle is False and config.sts_dir is None
    assert config.hidden_dropout_prob == 0.0
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'; did you mean learning_rate"):
        apply_overrides(config, ["learning_rat=1"])
    with pytest.raises(ConfigError, match=r"global_batch_size: 'sixty' is not a valid int"):
        apply_overrides(config, ["global_batch_size=sixty"])
    with pytest.raises(ConfigError, match=r"shuffle: 'maybe' is not a valid bool"):
        apply_overrides(config, ["shuffle=maybe"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"learning_rate": -1e-5}, r"^learning_rate: must be positive"),
        ({"global_batch_size": 60}, r"^global_batch_size: must be a multiple of the data-parallel size data\*fsdp = 8"),
        ({"train_file": "no/such/file.txt"}, r"^train_file: no such file"),
        ({"pooler": "max"}, r"^pooler: unknown pooler"),
        ({"gradient_accumulation_steps": 4}, r"^gradient_accumulation_steps: micro-batch accumulation"),
        ({"grad_cache_chunk_size": 12}, r"^grad_cache_chunk_size: must divide global_batch_size 64"),
        ({"mesh_data": 3}, r"^mesh_data: mesh sizes .* do not fit 8 devices"),
        ({"on_nonfinite": "ignore"}, r"^on_nonfinite:"),
        ({"contrastive_impl": "flash"}, r"^contrastive_impl: choose one of dense, blockwise, ring"),
        ({"contrastive_block_size": 0}, r"^contrastive_block_size: must be >= 1"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(changes, message):
    config = TrainConfig(train_file=__file__).replace(**changes)
    with pytest.raises(ConfigError, match=message):
        validate(config, num_devices=8)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nothing.py not found"):
        load_config(str(tmp_path / "nothing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ConfigError, match=r"bad.py: defines no get_config"):
        load_config(str(bad))


def test_resume_refuses_run_keys_and_accepts_the_others(tmp_path):
    import dataclasses

    from simcse_jax.config import FREE_KEYS, check_resume

    recorded = dataclasses.asdict(TrainConfig())
    path = tmp_path / "config.json"
    for key, value in (("global_batch_size", 128), ("learning_rate", 1e-4), ("model", "roberta-base"), ("seed", 7),
                       ("shuffle", False), ("temperature", 0.1), ("max_steps", 10), ("pooler", "avg"), ("do_mlm", True)):
        with pytest.raises(ConfigError, match=rf"^{path} records another run: {key} {recorded[key]!r} -> {value!r}\. .*"
                                              r"new --workdir.*--set allow_config_change=true"):
            check_resume(recorded, TrainConfig().replace(**{key: value}), path)
        run, free = check_resume(recorded, TrainConfig().replace(**{key: value}, allow_config_change=True), path)
        assert run == {key: (recorded[key], value)} and free == {"allow_config_change": (False, True)}
    changed = TrainConfig().replace(eval_steps=7, log_every=3, save_steps=5, mesh_data=2, mesh_fsdp=4)
    assert check_resume(recorded, changed, path) == ({}, {"eval_steps": (125, 7), "log_every": (10, 3), "save_steps": (0, 5),
                                                          "mesh_data": (-1, 2), "mesh_fsdp": (1, 4)})
    # The contrastive loss computed another way is the same run (a memory knob, like grad caching).
    swapped = TrainConfig().replace(contrastive_impl="ring", contrastive_block_size=256)
    assert check_resume(recorded, swapped, path) == ({}, {"contrastive_impl": ("dense", "ring"),
                                                          "contrastive_block_size": (1024, 256)})
    # A key that the recorded config predates is not a change; every free key is a real field.
    assert check_resume({k: v for k, v in recorded.items() if k != "seed"}, TrainConfig().replace(seed=1), path) == ({}, {})
    assert FREE_KEYS <= set(recorded)
    assert TrainConfig().keep_checkpoints >= 2  # a step to fall back to when the newest is damaged

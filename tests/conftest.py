"""Test-wide set-up: 8 CPU devices (before jax is imported) and shared fixtures."""

import os

# Must precede any jax import: every sharding test runs on 8 simulated CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The persistent compilation cache (on by default in cli.main): one fresh folder per test session,
# never the developer's ~/.cache.
os.environ.setdefault("SIMCSE_COMPILE_CACHE", __import__("tempfile").mkdtemp(prefix="simcse-xla-"))

# The loopback GCS server's fixtures (gcs_server, gcs_bucket); importing the module also sets the two
# variables gcsfs/fsspec read at import, so it comes before anything that may import them.
pytest_plugins = ["gcs_server"]

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

REAL_SENTENCES = [
    "A man is playing a guitar on the street.",
    "Two dogs run across a snowy field.",
    "The committee postponed its decision until next week because several members were absent.",
    "Stocks fell sharply.",
    "She said she'd be there by 5 p.m., but the train was late — again!",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
]


@pytest.fixture(scope="session")
def minilm_dir():
    from simcse_jax.hf_io import minilm_dir as _minilm_dir

    return _minilm_dir()


@pytest.fixture(scope="session")
def sts_dir():
    path = SHARED / "data" / "sts"
    if not path.is_dir():
        pytest.fail(f"STS data expected at {path} (../shared/data/sts beside the checkout)")
    return path


@pytest.fixture(scope="session")
def train_samples_dir():
    path = SHARED / "data" / "train_samples"
    if not path.is_dir():
        pytest.fail(f"training samples expected at {path}")
    return path


TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(minilm_dir, folder):
    import shutil

    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def minilm_tokenizer_dir(tmp_path_factory, minilm_dir):
    """MiniLM's (real) tokenizer files alone, for models built in the tests."""
    return copy_tokenizer(minilm_dir, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
    """A 2-layer, 32-wide random BERT with MiniLM's (real) tokenizer: fast to compile and run."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(path)
    return copy_tokenizer(minilm_dir, path)

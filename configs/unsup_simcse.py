"""Unsupervised SimCSE, the reference's released settings (Gao et al. 2021, Table/README).

    simcse-jax train --config configs/unsup_simcse.py:bert-base-uncased --workdir runs/unsup-bert-base
    simcse-jax train --config configs/unsup_simcse.py:roberta-large+mlm ...   # the MLM auxiliary variant

The sentence is encoded twice with independent dropout; pooler `cls` with the MLP in training
only (`mlp_only_train`); one epoch of wiki1m_for_simcse.txt (the reference's
data/download_wiki.sh), max length 32, temperature 0.05, STS-B dev every 125 steps.
"""

from simcse_jax.config import TrainConfig

# model -> (global batch, learning rate), from the reference README's hyperparameter table.
RECIPES = {
    "bert-base-uncased": (64, 3e-5),
    "bert-large-uncased": (64, 1e-5),
    "roberta-base": (512, 1e-5),
    "roberta-large": (512, 3e-5),
}


def get_config(arg=None):
    model, _, extra = (arg or "bert-base-uncased").partition("+")
    if model not in RECIPES:
        raise ValueError(f"unsup_simcse.py: unknown variant {model!r}; choose one of {', '.join(RECIPES)}")
    batch, lr = RECIPES[model]
    config = TrainConfig(
        model=model,
        # The reference trains in fp16 on GPUs; bf16 compute (fp32 params) is the TPU/GPU analogue.
        compute_dtype="bfloat16",
        train_file="data/wiki1m_for_simcse.txt",
        max_seq_length=32,
        pooler="cls",
        mlp_only_train=True,
        temperature=0.05,
        global_batch_size=batch,
        learning_rate=lr,
        num_epochs=1,
        eval_steps=125,
        seed=42,
    )
    if extra == "mlm":
        config = config.replace(do_mlm=True, mlm_weight=0.1, mlm_probability=0.15)
    elif extra:
        raise ValueError(f"unsup_simcse.py: unknown modifier +{extra}; the one modifier is +mlm")
    return config

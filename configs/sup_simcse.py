"""Supervised SimCSE on NLI triples, the reference's released settings.

    simcse-jax train --config configs/sup_simcse.py:roberta-large --workdir runs/sup-roberta-large

(sent0, sent1, hard_neg) rows of nli_for_simcse.csv (the reference's data/download_nli.sh:
SNLI + MNLI entailment pairs with contradiction hard negatives), three epochs, global batch 512,
pooler `cls` with the MLP kept at evaluation, temperature 0.05, hard-negative weight 0
(log-weight: weight 1), STS-B dev every 125 steps.
"""

from simcse_jax.config import TrainConfig

# model -> learning rate (batch 512 throughout), from the reference README's hyperparameter table.
RECIPES = {
    "bert-base-uncased": 5e-5,
    "bert-large-uncased": 1e-5,
    "roberta-base": 5e-5,
    "roberta-large": 1e-5,
}


def get_config(arg=None):
    model, _, extra = (arg or "bert-base-uncased").partition("+")
    if model not in RECIPES:
        raise ValueError(f"sup_simcse.py: unknown variant {model!r}; choose one of {', '.join(RECIPES)}")
    config = TrainConfig(
        model=model,
        compute_dtype="bfloat16",
        train_file="data/nli_for_simcse.csv",
        max_seq_length=32,
        pooler="cls",
        mlp_only_train=False,
        temperature=0.05,
        hard_negative_weight=0.0,
        global_batch_size=512,
        learning_rate=RECIPES[model],
        num_epochs=3,
        eval_steps=125,
        seed=42,
    )
    if extra == "mlm":
        config = config.replace(do_mlm=True, mlm_weight=0.1, mlm_probability=0.15)
    elif extra:
        raise ValueError(f"sup_simcse.py: unknown modifier +{extra}; the one modifier is +mlm")
    return config

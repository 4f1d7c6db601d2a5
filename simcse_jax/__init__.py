"""simcse-jax: SimCSE sentence embeddings in JAX/Flax NNX, with the contrastive batch spanning the pod."""

__version__ = "0.1.0"

"""The PyTorch reference SimCSE update step the benchmarks compare against (CPU and GPU).

It is the reference implementation's unsupervised step (`simcse/models.py: cl_forward` +
Hugging Face Trainer) reduced to what runs per update: a `transformers.BertModel` without its
pooling layer, the SimCSE MLP (dense + tanh) over [CLS], cosine similarities / temperature,
cross-entropy against the diagonal, `clip_grad_norm_` and `torch.optim.AdamW`. The model, batch,
sequence length and threads are the caller's, so both frameworks do the same work:

    views [B, num_sent, L] -> view(-1, L) -> BertModel -> [CLS] -> MLP -> z [B, num_sent, H]
    logits = cos(z1_i, z2_j) / T   (B, B);  loss = CE(logits, arange(B))

`amp_dtype=torch.bfloat16` runs the forward under `torch.autocast` (the GPU benchmark's bf16
mixed precision; fp32 master weights and optimiser state, as in the JAX step).

Two variants make the peer a GPU user would actually pick (benchmarks/bench_gpu.py):
- `cosine="matmul"`: normalise, then `z1 @ z2.T` [B, H] x [H, B]. The reference's broadcast cosine
  materialises [B, B, H] (48 GiB in fp32 at B = 4096, H = 768); the matmul gives the same logits
  (to rounding, tests/test_bench_gpu.py) in [B, B].
- `compile_mode`: `torch.compile(mode=...)` of the loss (forward + cosine + cross-entropy; AOTAutograd
  compiles its backward too); clipping and the fused AdamW stay eager, as in the usual compiled
  training loop. The compile happens at the first call, so a mode that cannot compile fails there.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn


class TorchSimCSEStep:
    """Callable `(input_ids, attention_mask, token_type_ids) -> loss` doing one full update."""

    def __init__(
        self,
        bert: nn.Module,
        *,
        temperature: float = 0.05,
        learning_rate: float = 3e-5,
        max_grad_norm: float = 1.0,
        device: str | torch.device = "cpu",
        amp_dtype: torch.dtype | None = None,
        fused_adamw: bool = False,
        seed: int = 0,
        cosine: str = "broadcast",
        compile_mode: str | None = None,
    ):
        if cosine not in ("broadcast", "matmul"):
            raise ValueError(f"cosine: expected 'broadcast' (the reference's) or 'matmul', got {cosine!r}")
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.bert = bert.to(self.device).train()
        hidden = bert.config.hidden_size
        # The reference's MLPLayer (a fresh dense + tanh; BertModel's own pooler is not used).
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()).to(self.device).train()
        self.params = [p for p in list(self.bert.parameters()) + list(self.mlp.parameters()) if p.requires_grad]
        kw = {"fused": True} if fused_adamw else {}
        self.opt = torch.optim.AdamW(self.params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kw)
        self.temperature = temperature
        self.max_grad_norm = max_grad_norm
        self.amp_dtype = amp_dtype
        self.cos = nn.CosineSimilarity(dim=-1)
        self.cosine = cosine
        # torch.compile checks the mode here (an unknown one raises at once); tracing and code
        # generation wait for the first call.
        self.loss_fn = self.loss if compile_mode is None else torch.compile(self.loss, mode=compile_mode)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [B, B'] of the rows of a [B, H] and b [B', H]."""
        if self.cosine == "matmul":
            # eps as CosineSimilarity's (1e-8), on each norm: identical for any non-degenerate row.
            a = nn.functional.normalize(a, dim=-1, eps=1e-8)
            b = nn.functional.normalize(b, dim=-1, eps=1e-8)
            return a @ b.T  # [B, H] x [H, B'] -> [B, B']
        # (B, 1, H) vs (1, B', H) -> (B, B'), the reference's broadcast cosine.
        return self.cos(a.unsqueeze(1), b.unsqueeze(0))

    def loss(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        b, s, length = input_ids.shape
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.bert(
                input_ids=input_ids.view(-1, length),
                attention_mask=attention_mask.view(-1, length),
                token_type_ids=token_type_ids.view(-1, length),
            )
            z = self.mlp(out.last_hidden_state[:, 0]).view(b, s, -1)
        z = z.float()
        logits = self.similarity(z[:, 0], z[:, 1]) / self.temperature
        if s == 3:
            logits = torch.cat([logits, self.similarity(z[:, 0], z[:, 2]) / self.temperature], 1)
        labels = torch.arange(b, device=self.device)
        return nn.functional.cross_entropy(logits, labels)

    def __call__(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        loss = self.loss_fn(input_ids, attention_mask, token_type_ids)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def to_torch_batch(batch: dict[str, np.ndarray], device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The JAX batch dict (int32 [B, num_sent, L]) as the int64 tensors BertModel takes."""
    return tuple(
        torch.from_numpy(np.asarray(batch[k], dtype=np.int64)).to(device)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    )


def flops_per_token_train(num_layers: int, hidden: int, intermediate: int, seq: int) -> float:
    """Model FLOPs per token of one training step (forward + backward = 3x forward), the usual
    MFU accounting: 2 FLOPs per multiply-add of every matmul weight (QKV, attention output,
    MLP, SimCSE MLP; embeddings are lookups) plus the two attention matmuls (scores, context)."""
    per_layer_weights = 4 * hidden * hidden + 2 * hidden * intermediate
    weights = num_layers * per_layer_weights + hidden * hidden  # + SimCSE MLP (on [CLS] only; upper bound)
    attention = num_layers * 2 * 2 * seq * hidden  # QK^T and PV: 2 matmuls of (s x d) . (d x s) per head
    return 3 * (2 * weights + attention)

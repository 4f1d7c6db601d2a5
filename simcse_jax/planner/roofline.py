"""TPU chips by their published figures, and the roofline bound on a step's time.

The table holds each generation's per-chip HBM capacity, peak bf16 matmul rate, HBM bandwidth
and inter-chip interconnect (ICI) bandwidth, as Google publishes them (sources beside each
entry). A compiled step supplies the other side: its FLOPs and HBM bytes per chip (XLA's
`cost_analysis()`) and the bytes each chip sends in its collectives (`hlo_collectives.py`).

The model (a lower bound on the step time, no efficiency factor):

    compute = flops / peak_flops_per_s
    hbm     = hbm_bytes / hbm_bytes_per_s
    ici     = ici_bytes / ici_bytes_per_s
    step   >= max(compute, hbm, ici)

i.e. the step is assumed to overlap all three perfectly and to run each at its peak. Real steps
are slower (latency of small ops, imperfect overlap, collectives not spread over every link), so
sentences/s = global batch / step is an upper bound, and so is the MFU it implies:
MFU <= compute / step (1.0 exactly when the step is compute-bound).

A second compute term counts what the step must compute whatever XLA reports: the model's matmul
FLOPs from its shapes (`step_model_flops`: encoder passes, pooler MLP, MLM head, the contrastive
logits). It matters where the compiled program loops: XLA's cost analysis counts a loop body once,
so a gradient-cached step (a loop over chunks) or a blockwise/ring loss (loops over key blocks)
reports a fraction of its work. The model count does not: the step's bound is the larger of the two
compute terms, the HBM term and the ICI term.

The inputs are XLA's own estimates, so the bound is only as tight as they are: `flops` counts
the program's operations (the model's matmuls plus everything else XLA runs), and `hbm_bytes`
is the cost analysis' "bytes accessed", the operands and outputs of every top-level fusion at
their full size, which can exceed the traffic the chip really has (an operand read in part, a
buffer kept in on-chip memory), making the HBM term pessimistic when it is the largest.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str  # the topology prefix: "v5e" in "v5e:4x4"
    device_kind: str  # what jax reports as `device.device_kind`
    hbm_bytes: int
    peak_flops_per_s: float  # bf16 matmul peak
    hbm_bytes_per_s: float
    # Bidirectional ICI bandwidth of one chip (all its links, both directions): the most bytes a
    # chip can exchange with its neighbours per second.
    ici_bytes_per_s: float
    cores_per_chip: int = 1  # TensorCores; v4/v5p chips run as one "megacore" jax device


# Sources (per chip): https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e (system architecture
# tables). "GB" there is 1e9 bytes except HBM capacity of v4 (GiB). v4's page gives no per-chip ICI
# figure: 6 links x 2 directions x 45 GB/s from "How to Scale Your Model" (jax-ml scaling book,
# "How to Think About TPUs"). v5p's "4800 Gbps" ICI is one direction (v5e's "1600 Gbps" is the
# same page family's figure for what the newer v5e page gives as "400 GBps bidirectional"), so
# v5p is 2 x 600 GB/s.
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", "TPU v4", 32 * GIB, 275e12, 1200e9, 6 * 2 * 45e9, cores_per_chip=2),
    "v5e": ChipSpec("v5e", "TPU v5 lite", 16 * 10**9, 197e12, 819e9, 400e9),
    "v5p": ChipSpec("v5p", "TPU v5", 95 * 10**9, 459e12, 2765e9, 2 * 600e9, cores_per_chip=2),
    "v6e": ChipSpec("v6e", "TPU v6 lite", 32 * 10**9, 918e12, 1638e9, 800e9),
}


def chip_by_device_kind(device_kind: str) -> ChipSpec | None:
    return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_s: float  # XLA's FLOPs at peak
    hbm_s: float
    ici_s: float
    model_compute_s: float = 0.0  # the model's matmul FLOPs at peak (`step_model_flops`)

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.model_compute_s, self.hbm_s, self.ici_s)

    @property
    def bound(self) -> str:
        """Which term sets the step time: "compute", "model compute", "HBM" or "ICI"."""
        terms = {"compute": self.compute_s, "model compute": self.model_compute_s, "HBM": self.hbm_s, "ICI": self.ici_s}
        return max(terms, key=terms.get)

    @property
    def mfu_bound(self) -> float:
        """The highest model-FLOPs utilisation the step can reach: compute time / step time."""
        compute = max(self.compute_s, self.model_compute_s)
        return compute / self.step_s if self.step_s > 0 else 0.0

    def sentences_per_s(self, global_batch: int) -> float:
        return global_batch / self.step_s if self.step_s > 0 else float("inf")


def roofline(flops: float, hbm_bytes: float, ici_bytes: float, chip: ChipSpec, model_flops: float = 0.0) -> Roofline:
    """The terms for one chip's share of a step (see the module docstring)."""
    return Roofline(
        compute_s=flops / chip.peak_flops_per_s,
        hbm_s=hbm_bytes / chip.hbm_bytes_per_s,
        ici_s=ici_bytes / chip.ici_bytes_per_s,
        model_compute_s=model_flops / chip.peak_flops_per_s,
    )


def step_model_flops(*, layers: int, hidden: int, intermediate: int, vocab: int, seq_len: int, global_batch: int,
                     num_sent: int, grad_cache: bool, contrastive_impl: str, do_mlm: bool, pooler_mlp: bool) -> dict[str, float]:
    """The matmul FLOPs one update step must do, summed over all chips, from the shapes alone.

    Per token and layer a forward costs 8 H^2 (Q, K, V, output projections) + 4 H I (the MLP)
    + 4 S H (scores and their weighted sum), at 2 FLOPs per multiply-add. A training pass is 3
    forwards (forward, then the two matmuls of each backward); gradient caching adds the first,
    gradient-free pass over every chunk (4). MLM (3 passes) runs the encoder again over the masked copy, plus
    the LM head (H^2 transform, H x vocab decoder) on every token. The pooler MLP (poolers with one) is
    2 H^2 per sentence per forward. The contrastive logits are B x B(num_sent - 1) dot products of length H:
    dense does them 3 times (forward, two gradients); blockwise and ring 4 (the backward recomputes
    each block from the saved log-sum-exp). Embedding lookups, norms and softmaxes are left out:
    this is a lower bound on the work, not an estimate of it.
    """
    passes = 4 if grad_cache else 3
    tokens = global_batch * num_sent * seq_len
    per_token = layers * (8 * hidden**2 + 4 * hidden * intermediate + 4 * seq_len * hidden)
    encoder = passes * tokens * per_token
    pooler = passes * global_batch * num_sent * 2 * hidden**2 if pooler_mlp else 0.0
    # MLM needs no cross-batch statistic, so a gradient-cached step can skip it in the first pass.
    mlm = 3 * tokens * (per_token + 2 * hidden**2 + 2 * hidden * vocab) if do_mlm else 0.0
    logits = 2.0 * global_batch * global_batch * (num_sent - 1) * hidden
    loss = logits * (3 if contrastive_impl == "dense" else 4)
    return {"encoder": float(encoder), "pooler": float(pooler), "mlm": float(mlm), "contrastive": float(loss),
            "total": float(encoder + pooler + mlm + loss)}

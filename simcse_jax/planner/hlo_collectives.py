"""The collectives in a compiled HLO module and the bytes each device sends in them per step.

Read from `compiled.as_text()` (the optimised, SPMD-partitioned program of one device):

- `count_collectives`: each kind as HLO instructions and as distinct collectives (by channel
  id). XLA:TPU clones one collective into many async fusions (overlapped with compute), lowers
  a reduce-scatter to a custom fusion calling `%all-reduce-scatter[.N]` (counted as a
  reduce-scatter; its body's all-reduce is not counted), and may turn FSDP weight-gradient
  reductions into collective-permute rings overlapped with the matmuls.
- `collective_traffic`: per kind, the bytes of the collectives' arrays and the bytes one device
  sends under the bandwidth-optimal (ring) algorithms, for a group of p devices and an array of
  n bytes (the full array: the operand of an all-reduce, reduce-scatter or all-to-all, the
  result of an all-gather):

      all-reduce           2 (p - 1) / p * n   (reduce-scatter then all-gather)
      all-gather           (p - 1) / p * n
      reduce-scatter       (p - 1) / p * n
      all-to-all           (p - 1) / p * n
      collective-permute   n

  One collective counts once however many async fusions XLA:TPU split it into (its
  instructions share a channel id and each carries the whole array). One inside a `while` body
  counts `known_trip_count` times (gradient caching's scan over chunks); `unknown_trip_counts`
  says how many sat in a loop whose trip count the HLO does not state (counted once).
"""

from __future__ import annotations

import math
import re
from collections import Counter

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
# An HLO instruction `%name = type op(...)`: the op (sync, or the `-start` of an async pair; the
# `-done` half moves no new data), so every collective counts once.
_OP_RE = re.compile(r"=\s*(.*?)\s\b(" + "|".join(COLLECTIVES) + r")(-start)?\((.*)$")
_CHANNEL_RE = re.compile(r"channel_id=(\d+)")
# XLA:TPU's reduce-scatter: a custom fusion whose called computation is `%all-reduce-scatter...`.
_TPU_REDUCE_SCATTER_CALL = re.compile(r"calls=%?(all-reduce-scatter(\.\d+)?)\b")
_SHAPE_RE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")
_GROUPS_LIST_RE = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
# jax >= 0.9 on TPU: replica_groups=mesh['axis_0'=2,'axis_1'=2] ... {'axis_1'}: the named axes.
_GROUPS_MESH_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_WHILE_RE = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS_RE = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+(?:, ?%?[\w.\-]+)*)\}?")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "f8e4m3fn": 8, "f8e5m2": 8}


def bytes_of(types_text: str) -> int:
    """Total bytes of every array type (`bf16[768,3072]{...}`) in `types_text`."""
    total = 0
    for dtype, dims in _SHAPE_RE.findall(types_text):
        elements = math.prod(int(d) for d in dims.split(",") if d)
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype))
        total += elements * bits // 8
    return total


def _group_size(line: str) -> int | None:
    m = _GROUPS_MESH_RE.search(line)
    if m:
        sizes = {k.strip().strip("'"): int(v) for k, v in re.findall(r"('[^']+')=(\d+)", m.group(1))}
        return math.prod(sizes.get(a.strip().strip("'"), 1) for a in m.group(2).split(",") if a.strip())
    m = _GROUPS_IOTA_RE.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST_RE.search(line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    return None


def _computations(hlo_text: str):
    """[(computation name, header line, [lines])] in text order; ENTRY is named 'ENTRY'."""
    out, name, header, lines = [], None, "", []
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            if name is not None:
                out.append((name, header, lines))
            head = line.split()
            name = "ENTRY" if head[0] == "ENTRY" else head[0].lstrip("%")
            header, lines = line, []
        elif name is not None:
            lines.append(line)
    if name is not None:
        out.append((name, header, lines))
    return out


def _multipliers(comps) -> tuple[dict[str, int], set[str]]:
    """How many times each computation runs per call of ENTRY (while bodies x trip count), and
    the computations inside a loop of unknown trip count."""
    calls: dict[str, list[tuple[str, int, bool]]] = {name: [] for name, _, _ in comps}
    for name, _, lines in comps:
        for line in lines:
            w = _WHILE_RE.search(line)
            if w:
                trip = _TRIP_RE.search(line)
                calls[name].append((w.group(1), int(trip.group(1)) if trip else 1, trip is None))
            for m in _CALLS_RE.finditer(line):
                for callee in re.split(r",\s*", m.group(1)):
                    callee = callee.lstrip("%")
                    if not (w and callee == w.group(1)):
                        calls[name].append((callee, 1, False))
    mult: dict[str, int] = {}
    unknown: set[str] = set()

    def visit(name, factor, in_unknown, depth=0):
        if name not in calls or depth > 64 or mult.get(name, 0) >= factor and not in_unknown:
            return
        mult[name] = max(mult.get(name, 0), factor)
        if in_unknown:
            unknown.add(name)
        for callee, n, unk in calls[name]:
            visit(callee, factor * n, in_unknown or unk, depth + 1)

    visit("ENTRY", 1, False)
    return mult, unknown


def _instructions(comps):
    """(kind, identity, computation, line) for every collective instruction; the identity is
    the channel id (shared by the async pieces of one collective) or the instruction name."""
    for comp, _, lines in comps:
        if comp.startswith("all-reduce-scatter"):
            continue  # the body of XLA:TPU's reduce-scatter fusion: counted at its call site
        for line in lines:
            name = line.split("=")[0].strip().removeprefix("ROOT ").strip()
            if _TPU_REDUCE_SCATTER_CALL.search(line):
                yield "reduce-scatter", name, comp, line
                continue
            m = _OP_RE.search(line)
            if m:
                ch = _CHANNEL_RE.search(line)
                yield m.group(2), f"channel {ch.group(1)}" if ch else name, comp, line


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{'distinct': {kind: n}, 'instructions': {kind: n}} (see the module docstring)."""
    instructions, distinct = Counter(), {c: set() for c in COLLECTIVES}
    for kind, ident, _, _ in _instructions(_computations(hlo_text)):
        instructions[kind] += 1
        distinct[kind].add(ident)
    return {
        "distinct": {c: len(distinct[c]) for c in COLLECTIVES},
        "instructions": {c: instructions.get(c, 0) for c in COLLECTIVES},
    }


def _full_array_bytes(kind: str, line: str, headers: dict[str, str]) -> tuple[int, int | None]:
    """(n, p from the shapes when the line does not give groups) for one collective line."""
    if kind == "reduce-scatter" and _OP_RE.search(line) is None:
        # The TPU fusion: its called computation's header is `(input: T[full]) -> T[piece]`.
        callee = _TPU_REDUCE_SCATTER_CALL.search(line).group(1)
        ins, _, outs = headers.get(callee, "").partition("->")
        n, piece = bytes_of(ins), bytes_of(outs)
        return n, (round(n / piece) if piece else None)
    m = _OP_RE.search(line)
    # The result type: the full array, except a plain reduce-scatter's piece (the caller scales
    # it). Async `-start` forms (not emitted by XLA:CPU or XLA:TPU for these programs) would
    # carry their operands in the result tuple too and are counted the same way, i.e. over.
    return bytes_of(m.group(1)), None


def collective_traffic(hlo_text: str, num_devices: int) -> dict:
    """{'per_kind': {kind: {'count', 'array_bytes', 'sent_bytes'}}, 'total_sent_bytes',
    'unknown_trip_counts'} per device per step (see the module docstring). A collective that
    names no replica groups spans all `num_devices`."""
    comps = _computations(hlo_text)
    headers = {name: header for name, header, _ in comps}
    mult, unknown = _multipliers(comps)
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for kind, ident, comp, line in _instructions(comps):
        key = (kind, ident)
        if key not in seen or mult.get(comp, 1) > mult.get(seen[key][0], 1):
            seen[key] = (comp, line)
    per_kind = {c: {"count": 0, "array_bytes": 0, "sent_bytes": 0.0} for c in COLLECTIVES}
    unknown_count = 0
    for (kind, _), (comp, line) in seen.items():
        n, p_from_shapes = _full_array_bytes(kind, line, headers)
        p = _group_size(line) or p_from_shapes or num_devices
        if kind == "reduce-scatter" and _OP_RE.search(line) is not None:
            n *= p  # a plain reduce-scatter's result is one piece
        times = mult.get(comp, 1)
        unknown_count += comp in unknown
        factor = 2 * (p - 1) / p if kind == "all-reduce" else 1.0 if kind == "collective-permute" else (p - 1) / p
        per_kind[kind]["count"] += times
        per_kind[kind]["array_bytes"] += n * times
        per_kind[kind]["sent_bytes"] += factor * n * times
    return {
        "per_kind": per_kind,
        "total_sent_bytes": sum(v["sent_bytes"] for v in per_kind.values()),
        "unknown_trip_counts": unknown_count,
    }

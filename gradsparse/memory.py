"""The memory a training run needs, estimated before anything is allocated or written.

:func:`estimate` counts, in bytes, what one training step holds at its peak:

- parameters P (every array of the model) and the optimizer state S (plus the covariance
  accumulators with ``track_covariance``), both exact: their shapes come from
  ``eqx.filter_eval_shape`` of :func:`gradsparse.factory.build` / ``init_state`` (nothing is
  allocated);
- gradients G (the trainable arrays) and the step's outputs, a new model and state (P + S: the
  jitted step does not donate its inputs);
- activations of the monitored step on a batch of B samples with T tokens each (T = 1 for the
  MLP, the patches for the ViT, ``seq_len`` for the LM), kept for the backward pass:
  ``4 B T [sum_blocks (4 n + 4 d) + transformer blocks 6 d + d_in + C_tok]`` bytes (float32;
  x, z, a, sigma'(z) per MLP block, LayerNorm/residual/output per token, q, k, v and the head
  output per attention block, the input and the logits), plus the attention scores and
  probabilities ``2 * depth * B * heads * T * T * 4`` bytes;
- the monitor probes (zero arrays at a and y and their gradients): ``2 * 4 B T sum_blocks (n + d)``;
- the same on the held-out batch (``eval_batch`` samples), and, with ``flatness_every``, a
  Hutchinson probe: a Rademacher tree and its Hessian-vector product (2 G) plus twice the
  training activations (forward-over-reverse); the final evaluation is a forward pass over
  chunks of 512 samples (256 text windows), one block alive at a time (its widest activations
  and its attention). These run one after the other, so the peak counts the largest of
  (training step, held-out step, flatness, final evaluation).

total = P + S + G + (P + S) + max(train, held-out, flatness, final evaluation); against the
measured peak RSS on a CPU it lies a few percent above (docs/engine_measurements.md).
:func:`check_fits` refuses only what exceeds the memory
of the device (``memory_stats()['bytes_limit']`` on an accelerator) or of the machine
(``os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')``, or a smaller cgroup limit).
With data parallelism the batch terms are divided by the number of devices.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from gradsparse.config import TrainConfig
from gradsparse.data import DataInfo
from gradsparse.factory import Built, build, init_state, make_accumulator, make_optimizer

_F32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per term (see the module docstring); ``total`` is what :func:`check_fits` compares."""

    parameters: int
    optimizer_state: int
    gradients: int
    step_outputs: int
    activations: int  # of the phase with the largest batch terms, attention and probes included
    attention: int  # of which: attention scores and probabilities
    probes: int  # of which: monitor probes
    flatness: int  # the Hutchinson term, when flatness is the peak phase (else 0)
    total: int
    peak_phase: str = "training batch"  # training batch | held-out batch | flatness probes | final evaluation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: the total and its main terms."""
        parts = [f"parameters {fmt_bytes(self.parameters)}", f"optimizer state {fmt_bytes(self.optimizer_state)}",
                 f"gradients {fmt_bytes(self.gradients)}", f"step outputs {fmt_bytes(self.step_outputs)}",
                 f"activations on the {self.peak_phase} {fmt_bytes(self.activations)}"]
        inner = []
        if self.attention:
            inner.append(f"attention B*heads*T*T {fmt_bytes(self.attention)}")
        if self.probes:
            inner.append(f"probes {fmt_bytes(self.probes)}")
        if inner:
            parts[-1] += f" incl. {' and '.join(inner)}"
        return f"about {fmt_bytes(self.total)} ({', '.join(parts)})"


def fmt_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. '1.5 GiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _nbytes(tree: Any) -> int:
    return sum(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype"))


def _shapes(cfg: TrainConfig, info: DataInfo, start: Built | None) -> tuple[Any, Any, Any]:
    """(model, trainable arrays, state) as shape structures; nothing is allocated."""
    optimizer = make_optimizer(cfg)
    if start is None:
        def make(key):
            built = build(cfg, info, key)
            state = init_state(cfg, built, optimizer, make_accumulator(cfg, built.model))
            return built.model, eqx.filter(built.model, built.trainable), state
        return eqx.filter_eval_shape(make, jax.random.key(0))

    def make_state():
        return init_state(cfg, start, optimizer, make_accumulator(cfg, start.model))
    return start.model, eqx.filter(start.model, start.trainable), eqx.filter_eval_shape(make_state)


def _batch_bytes(batch: int, tokens: int, blocks: list[tuple[int, int]], transformer: bool, heads: int,
                 d_in: int, logits: int) -> tuple[int, int, int]:
    """(activations without attention, attention, probes) of one monitored step on ``batch`` samples
    (``d_in`` input numbers and ``logits`` output numbers per sample)."""
    bt = batch * tokens
    per_token = sum(4 * n + 4 * d for d, n in blocks) + (sum(6 * d for d, _ in blocks) if transformer else 0)
    act = _F32 * bt * per_token + _F32 * batch * (d_in + logits)
    att = 2 * len(blocks) * batch * heads * tokens * tokens * _F32 if transformer else 0
    probes = 2 * _F32 * bt * sum(n + d for d, n in blocks)
    return act, att, probes


def estimate(cfg: TrainConfig, info: DataInfo, start: Built | None = None, *, devices: int = 1) -> MemoryEstimate:
    """The memory training ``cfg`` needs on data described by ``info`` (see the module docstring).

    ``start``: the starting model of a finetuning run (its arrays are measured instead of
    building); ``devices``: how many devices share each batch (data parallelism).
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a TrainConfig")
    if not isinstance(info, DataInfo):
        raise ValueError(f"info: got {type(info).__name__}; allowed: a gradsparse.data.DataInfo")
    if start is not None and not isinstance(start, Built):
        raise ValueError(f"start: got {type(start).__name__}; allowed: a gradsparse.factory.Built")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices: must be an integer, got {devices!r}; allowed: >= 1")
    model, trainable, state = _shapes(cfg, info, start)
    p, g, s = _nbytes(model), _nbytes(trainable), _nbytes(state)
    blocks = [(int(b.d), int(b.n)) for b in model.mlp_blocks()]
    tokens = int(getattr(model, "tokens_per_sample", 1))
    transformer = cfg.model != "mlp"
    d_in = int(math.prod(info.input_shape)) if info.input_shape else tokens
    logits = info.num_classes * (tokens if cfg.model == "lm" else 1)  # the LM predicts every position
    per = lambda b: _batch_bytes(-(-b // devices), tokens, blocks, transformer, cfg.heads, d_in, logits)  # noqa: E731
    act, att, probes = per(cfg.batch_size)
    phases = {"training batch": (act + att + probes, att, probes, 0)}
    ev = per(cfg.eval_batch)
    phases["held-out batch"] = (sum(ev), ev[1], ev[2], 0)
    if cfg.flatness_every:
        flat = 2 * g + 2 * (act + att + probes)
        phases["flatness probes"] = (flat, 2 * att, 2 * probes, flat)
    # the final evaluation: forward only, in chunks of up to 512 samples (256 text windows), one block at a time
    fe = -(-(256 if cfg.model == "lm" else 512) // devices)
    widest = max((2 * n + (8 * d if transformer else 2 * d)) for d, n in blocks)
    fe_att = 2 * fe * cfg.heads * tokens * tokens * _F32 if transformer else 0
    phases["final evaluation"] = (_F32 * fe * tokens * widest + _F32 * fe * (d_in + logits) + fe_att, fe_att, 0, 0)
    phase = max(phases, key=lambda k: phases[k][0])
    peak, att, probes, flat = phases[phase]
    total = p + s + g + (p + s) + peak
    return MemoryEstimate(parameters=p, optimizer_state=s, gradients=g, step_outputs=p + s, activations=peak,
                          attention=att, probes=probes, flatness=flat, total=total, peak_phase=phase)


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def available_memory() -> tuple[int, str]:
    """(bytes, what they are): the first device's memory limit on an accelerator, else the
    machine's physical memory from ``os.sysconf`` (or a smaller cgroup limit)."""
    try:
        dev = jax.devices()[0]
        if dev.platform != "cpu":
            stats = dev.memory_stats() or {}
            limit = stats.get("bytes_limit")
            if isinstance(limit, int) and limit > 0:
                return limit, f"the memory of {dev.device_kind} ({dev.platform})"
    except Exception:  # noqa: BLE001 - a backend without memory stats: fall back to the host
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cg = _cgroup_limit()
    if cg is not None and cg < total:
        return cg, "this machine's memory limit (cgroup)"
    return total, "this machine's memory (os.sysconf)"


def check_fits(cfg: TrainConfig, info: DataInfo, start: Built | None = None, *, devices: int = 1,
               memory: tuple[int, str] | None = None) -> MemoryEstimate:
    """The :func:`estimate` of ``cfg``; ValueError (one line: the estimate and the memory) when
    it exceeds ``memory`` (default :func:`available_memory`)."""
    est = estimate(cfg, info, start, devices=devices)
    limit, what = memory if memory is not None else available_memory()
    if est.total > limit:
        raise ValueError(f"memory: this config needs {est.describe()}, more than the {fmt_bytes(limit)} of {what}; "
                         "use a smaller batch_size, eval_batch, seq_len, width, depth or mlp_ratio")
    return est

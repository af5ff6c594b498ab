"""Byte-identity proof of the training engine: what four tiny runs write, as SHA-256 digests.

Runs (each a few dozen steps on 2 CPU cores):

- ``mlp``: a residual LN-MLP on synthetic random inputs with plug-ins (zeroth bias, restricted LN,
  synapse noise), covariance tracking, a fixed flatness subset and label noise; log every 6
  steps, checkpoints every 10, ``fuse_steps`` 4 (fused chunks between log points);
- ``seeds``: the same MLP without plug-ins, two seeds trained together (``train_seeds``);
- ``lm``: the byte LM on a generated text file, fused chunks of 4;
- ``relufy``: relufication of the tiny random BERT of ``tests/tiny_bert.py`` (mix + both modules).

For each run: the SHA-256 of ``log.jsonl``, of ``summary.json`` without its clock field
(``train_time_s``) and, per checkpoint, of its leaves (the payload after the header line) and of
its header without clock or integrity fields (``loop.elapsed_s``, ``header_sha256``; the temp
folder's path replaced by ``<root>``). ``times.jsonl`` and ``meta.json`` hold clocks and versions
and are not compared.

``python tests/byte_identity.py --record FILE`` writes the digests with the environment's
fingerprint (:func:`fingerprint`); run it with ``PYTHONPATH`` at an older checkout to record what
that code wrote. ``tests/test_byte_identity.py`` reruns :func:`run_all` with the current code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

#: config fields added after the fixture was recorded, with the value that reproduces the old
#: behaviour: removed from a checkpoint header's config before hashing when they hold that value
ADDED_FIELDS = {"relufy": {"fuse_steps": 1}}

MLP = dict(data="random_inputs", n_train=96, n_test=32, width=8, depth=2, batch_size=8, steps=32, log_every=6,
           checkpoint_every=10, eval_batch=16, fuse_steps=4)
MLP_PLUGINS = dict(MLP, zeroth_bias=True, restricted_ln=True, weight_noise="synapse", rho=0.05,
                   track_covariance=True, flatness_every=12, flatness_probes=2, flatness_subset=16,
                   label_noise=0.1)
LM = dict(model="lm", data="text", width=16, depth=1, heads=2, seq_len=16, batch_size=4, steps=20, log_every=5,
          checkpoint_every=8, eval_batch=8, fuse_steps=4, mlp_ratio=2)
RELUFY = dict(activation="mix", modules=("zeroth_bias", "restricted_ln"), steps=6, batch_size=4, seq_len=12,
              log_every=2, checkpoint_every=3, lr=1e-3, t_mix=3, t_up=3)


def fingerprint() -> dict[str, str]:
    """What must be equal for bit-equal floats: the numeric stack's versions and the CPU."""
    import jax
    import jaxlib
    import numpy as np

    cpu = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("flags")), "")
        cpu = model + " | flags " + hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
    except OSError:
        cpu = platform.processor() or platform.machine()
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "machine": platform.machine(), "cpu": cpu}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _header_digest(line: bytes, root: Path, run: str) -> str:
    h = json.loads(line)
    h.pop("header_sha256", None)
    if isinstance(h.get("loop"), dict):
        h["loop"] = {k: v for k, v in h["loop"].items() if k != "elapsed_s"}
    cfg = h.get("config")
    for k, v in ADDED_FIELDS.get(run, {}).items():
        if isinstance(cfg, dict) and cfg.get(k) == v:
            del cfg[k]
    text = json.dumps(h, sort_keys=True).replace(str(root), "<root>")
    return _sha(text.encode())


def digest_run(folder: Path, root: Path, run: str) -> dict[str, str]:
    """{file: digest} of one run folder (see the module docstring)."""
    out = {"log.jsonl": _sha((folder / "log.jsonl").read_bytes())}
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("train_time_s", None)
    out["summary.json"] = _sha(json.dumps(summary, sort_keys=True).replace(str(root), "<root>").encode())
    for p in sorted((folder / "checkpoints").glob("step_*.eqx")):
        raw = p.read_bytes()
        cut = raw.index(b"\n")
        out[f"{p.name}:header"] = _header_digest(raw[:cut], root, run)
        out[f"{p.name}:payload"] = _sha(raw[cut + 1:])
    first = json.loads((folder / "log.jsonl").read_text().splitlines()[0])
    out["first_loss"] = repr(float(first["loss"]))
    return out


def _text(path: Path) -> None:
    import numpy as np

    words = ("def return import class self lambda for while if else none true false the a of and to in is "
             "sparse gradient flat minima key value layer norm").split()
    rng = np.random.default_rng(0)
    lines = [" ".join(words[i] for i in rng.integers(0, len(words), 9)) for _ in range(900)]
    path.write_text("\n".join(lines) + "\n")


def _distill_config(folder: Path, **extra):
    try:
        from gradsparse.relufy import DistillConfig
    except ImportError:  # the layout before the relufy package
        from gradsparse.relufy_config import DistillConfig
    import dataclasses

    names = {f.name for f in dataclasses.fields(DistillConfig)}
    fields = dict(RELUFY, **{k: v for k, v in {**ADDED_FIELDS["relufy"], **extra}.items() if k in names})
    return DistillConfig(str(folder.resolve()), **fields)


def run_all(root: Path, runs: tuple[str, ...] = ("mlp", "seeds", "lm", "relufy")) -> dict[str, dict[str, str]]:
    """Run ``runs`` into ``root/<run>`` and return their digests."""
    from gradsparse.config import TrainConfig
    from gradsparse.relufy import relufy
    from gradsparse.train import train
    from gradsparse.train_seeds import train_seeds
    from tiny_bert import write_tiny_bert

    root = Path(root)
    res: dict[str, dict[str, str]] = {}
    if "mlp" in runs:
        train(TrainConfig(**MLP_PLUGINS), root / "mlp", progress=False)
        res["mlp"] = digest_run(root / "mlp", root, "mlp")
    if "seeds" in runs:
        train_seeds([TrainConfig(**MLP, seed=s) for s in (3, 4)], [root / "seeds3", root / "seeds4"])
        d3, d4 = digest_run(root / "seeds3", root, "seeds"), digest_run(root / "seeds4", root, "seeds")
        res["seeds"] = {**{f"3/{k}": v for k, v in d3.items()}, **{f"4/{k}": v for k, v in d4.items()}}
        res["seeds"]["first_loss"] = d3["first_loss"]
    if "lm" in runs:
        _text(root / "text.txt")
        train(TrainConfig(**LM, data_path=str(root / "text.txt")), root / "lm", progress=False)
        res["lm"] = digest_run(root / "lm", root, "lm")
    if "relufy" in runs:
        write_tiny_bert(root / "bert")
        relufy(_distill_config(root / "bert"), root / "relufy", progress=False)
        res["relufy"] = digest_run(root / "relufy", root, "relufy")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, help="write the digests and fingerprint to this JSON file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        digests = run_all(Path(tmp).resolve())
    import gradsparse

    print(f"code: {Path(gradsparse.__file__).parent}", file=sys.stderr)
    doc = {"fingerprint": fingerprint(), "runs": digests}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if args.record:
        args.record.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Input validation wherever a user reaches: configs, flags, data files, checkpoints.

Bad input -> one line on stderr, exit code 2, nothing written. NaN/inf during training -> one
line naming the step and the layer, exit code 3, the log ending at the last good logged step and
the last good checkpoint kept. Property tests: configs raise only ValueError; the train command
exits 0/2 (or argparse's SystemExit(2)) and never with a traceback.
"""

import argparse
import dataclasses
import functools
import gzip
import json
import math
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradsparse.data as gdata
import gradsparse.commands.train as train_cmd
import gradsparse.train as gtrain
from gradsparse.checkpoint import header_line, list_checkpoints, load_checkpoint
from gradsparse.cli import build_parser, main
from gradsparse.config import TrainConfig
from gradsparse.data import Dataset, load_dataset

TINY = ["--data", "random_inputs", "--n-train", "128", "--n-test", "32", "--width", "8", "--depth", "2",
        "--batch-size", "8", "--eval-batch", "16", "--quiet"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Data files, good and bad, in one folder."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    good = root / "fashion"
    good.mkdir()
    for split, n in (("train", 30), ("t10k", 10)):
        (good / f"{split}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        (good / f"{split}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n, dtype=np.uint8)))
    for name, damage in (("truncated", lambda b: b[:-5]), ("garbage", lambda b: b"\x07\x07\x07\x07" + b[4:]),
                         ("badgzip", None)):
        bad = root / f"fashion_{name}"
        bad.mkdir()
        for p in good.iterdir():
            (bad / p.name).write_bytes(p.read_bytes())
        if damage is None:
            (bad / "t10k-labels-idx1-ubyte").unlink()
            (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"0123456789")[:-4])
        else:
            p = bad / "train-images-idx3-ubyte"
            p.write_bytes(damage(p.read_bytes()))
    (root / "empty.txt").write_bytes(b"")
    (root / "short.txt").write_bytes(b"abcdefghij" * 100)  # 1000 bytes: 100 held out
    (root / "notjson.json").write_text("{width: 8")
    (root / "list.json").write_text("[1, 2]")
    (root / "unknown.json").write_text(json.dumps({"widht": 8}))
    (root / "wrongtype.json").write_text(json.dumps({"width": "wide"}))
    (root / "afile").write_text("x")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run (6 steps, checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", *TINY, "--steps", "6", "--log-every", "2", "--checkpoint-every", "3", "--out", str(out)]) == 0
    return out


BAD_TRAIN_ARGS = [
    (["--activation", "swish"], "unknown activation"),
    (["--lr", "-1"], "lr"),
    (["--rho", "-0.5"], "rho"),
    (["--weight-decay=-1e-3"], "weight_decay"),
    (["--grad-clip", "nan"], "grad_clip"),
    (["--momentum", "1"], "momentum"),
    (["--steps", "0"], "steps"),
    (["--seed", str(2**32)], "seed"),
    (["--width", "60000"], "more than the limit"),
    (["--schedule", "cosine", "--steps", "1"], "cosine"),
    (["--warmup", "10", "--steps", "10"], "warmup"),
    (["--model", "vit", "--data", "fashion_mnist", "--width", "10", "--heads", "3"], "heads: 3 does not divide"),
    (["--model", "vit", "--data", "random_inputs"], "needs image data"),
    (["--model", "lm", "--data", "random_inputs"], "trains on data 'text'"),
    (["--data", "random_inputs", "--n-train", "10", "--batch-size", "16"], "batch_size 16 exceeds the 10"),
    (["--data", "random_inputs", "--data-path", "{inputs}/afile"], "reads no file"),
    (["--model", "vit", "--data-path", "{inputs}/fashion", "--patch", "5", "--width", "8", "--heads", "2",
      "--batch-size", "8"], "patch 5 must divide the image size 28x28"),
    (["--model", "vit", "--data-path", "{inputs}/fashion", "--n-train", "100"], "n_train 100 exceeds the 30"),
    (["--model", "vit", "--data-path", "{inputs}/fashion_truncated"], "truncated"),
    (["--model", "vit", "--data-path", "{inputs}/fashion_garbage"], "not an unsigned-byte IDX file"),
    (["--model", "vit", "--data-path", "{inputs}/fashion_badgzip"], "cannot read IDX file"),
    (["--model", "vit", "--data-path", "{inputs}/nowhere"], "apt-get install dataset-fashion-mnist"),
    (["--model", "lm", "--data-path", "{inputs}/empty.txt"], "at least 1000 bytes"),
    (["--model", "lm", "--data-path", "{inputs}"], "is a folder"),
    (["--model", "lm", "--data-path", "{inputs}/short.txt", "--seq-len", "500", "--width", "8", "--heads", "2"],
     "seq_len 500 needs at least 502 bytes of held-out text"),
    (["--model", "lm", "--n-train", "100"], "does not apply to data 'text'"),
    (["--config", "{inputs}/notjson.json"], "not readable JSON"),
    (["--config", "{inputs}/list.json"], "must hold a JSON object"),
    (["--config", "{inputs}/unknown.json"], "unknown config keys ['widht'] (did you mean 'widht' -> 'width'?)"),
    (["--config", "{inputs}/wrongtype.json"], "width: must be an integer"),
    (["--config", "{inputs}"], "is a folder"),
    (["--config", "{inputs}/missing.json"], "does not exist"),
]


@pytest.mark.parametrize("argv,needle", BAD_TRAIN_ARGS, ids=[str(i) for i in range(len(BAD_TRAIN_ARGS))])
def test_bad_train_input_one_line_exit_2_nothing_written(tmp_path, capsys, inputs, argv, needle):
    argv = [a.replace("{inputs}", str(inputs)) for a in argv]
    out = tmp_path / "run"
    code = main(["train", *argv, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert err.startswith("gradsparse train: error: ")
    assert not out.exists()


def test_out_is_a_file(tmp_path, capsys, inputs):
    assert main(["train", "--out", str(inputs / "afile"), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert (inputs / "afile").read_text() == "x"


# --------------------------------------------------------------------------- checkpoints
def _forge_width(ck: Path, dst: Path, width: int) -> Path:
    """A copy of checkpoint ``ck`` whose header claims another width (leaves unchanged), with a
    header_sha256 that matches the forged header (an internally consistent file)."""
    raw = ck.read_bytes()
    cut = raw.index(b"\n")
    header = json.loads(raw[:cut])
    header["config"]["width"] = width
    dst.write_bytes(header_line(header) + raw[cut:])
    return dst


def test_damaged_or_foreign_checkpoints_exit_2(tmp_path, capsys, run_dir):
    ck = list_checkpoints(run_dir)[-1][1]
    raw = ck.read_bytes()
    cases = []
    (tmp_path / "truncated.eqx").write_bytes(raw[:-37])
    cases.append((tmp_path / "truncated.eqx", "truncated or damaged"))
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    (tmp_path / "flipped.eqx").write_bytes(bytes(flipped))
    cases.append((tmp_path / "flipped.eqx", "SHA-256"))
    cases.append((_forge_width(ck, tmp_path / "forged.eqx", 16), "does not fit the model its header describes"))
    (tmp_path / "random.eqx").write_bytes(np.random.default_rng(0).bytes(300))
    cases.append((tmp_path / "random.eqx", "not a gradsparse checkpoint"))
    (tmp_path / "other.eqx").write_bytes(b'{"format": "something-else"}\n' + raw[raw.index(b"\n") + 1:])
    cases.append((tmp_path / "other.eqx", "not a gradsparse checkpoint"))
    legacy = json.loads(raw[:raw.index(b"\n")])  # a header without payload fields: leaves checked one by one
    legacy.pop("payload_bytes"), legacy.pop("payload_sha256"), legacy.pop("header_sha256")
    legacy["config"]["depth"] = 3
    (tmp_path / "legacy.eqx").write_bytes(json.dumps(legacy).encode() + b"\n" + raw[raw.index(b"\n") + 1:])
    cases.append((tmp_path / "legacy.eqx", "does not fit"))
    for path, needle in cases:
        before = files_under(tmp_path)
        for argv in (["spectrum", str(path)], ["finetune", str(path), "--modules", "zeroth_bias", "--steps", "2",
                                               "--out", str(tmp_path / "ft"), "--quiet"]):
            code = main(argv)
            err = capsys.readouterr().err.strip()
            assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)
            assert files_under(tmp_path) == before and not (tmp_path / "ft").exists()
    # the good checkpoint still loads, and its leaves are finite
    model, opt_state, header = load_checkpoint(ck)
    assert header["step"] == 6
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(model))


def test_resume_on_damaged_run_exit_2_nothing_written(tmp_path, capsys, run_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ck = list_checkpoints(run)[-1][1]
    good = ck.read_bytes()
    cases = [(lambda: ck.write_bytes(good[:-1]), "truncated or damaged"),
             (lambda: _forge_width(ck, ck, 16), "width: 8 differs from 16 of checkpoint"),
             (lambda: (run / "config.json").write_text("{"), "config.json is not readable JSON"),
             (lambda: (run / "config.json").write_text(json.dumps({"width": -1})), "config.json is not a valid config"),
             (lambda: (run / "log.jsonl").write_text('{"step": 0}\n'), "lost lines")]
    for damage, needle in cases:
        shutil.rmtree(run)
        shutil.copytree(run_dir, run)
        damage()
        before = files_under(run)
        code = main(["train", "--out", str(run), "--resume", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (needle, err)
        assert files_under(run) == before


# --------------------------------------------------------------------------- NaN / inf
def test_nan_stops_exit_3_log_and_checkpoint_kept(tmp_path, capsys, monkeypatch):
    """An example with NaN features first enters the batch of step 7: the run stops there."""
    ds = load_dataset("random_inputs", seed=0, n_train=128, n_test=32)
    k_data = jax.random.split(jax.random.key(0), 5)[1]  # train's data key for seed 0
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, 0), 128))
    x = ds.x_train.copy()
    x[perm[7 * 8 + 3]] = np.nan  # 4th example of step 7's batch (batch size 8)
    bad = Dataset("random_inputs", "vector", x, ds.y_train, ds.x_test, ds.y_test, 10)
    monkeypatch.setattr(gdata, "load_dataset", lambda *a, **k: bad)
    out = tmp_path / "run"
    argv = ["train", *TINY, "--steps", "20", "--log-every", "3", "--checkpoint-every", "5", "--out", str(out)]
    for attempt in (argv, ["train", "--out", str(out), "--resume", "--quiet"]):
        code = main(attempt)
        err = capsys.readouterr().err.strip()
        assert code == 3, err
        assert len(err.splitlines()) == 1 and "step 7 (MLP block 0" in err and "step_00000005.eqx" in err, err
        recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [0, 3, 6]  # ends at the last good logged step
        assert all(math.isfinite(r["loss"]) for r in recs)
        assert [s for s, _ in list_checkpoints(out)] == [5]
        assert not (out / "summary.json").exists()
    model, _, header = load_checkpoint(out)
    assert header["step"] == 5
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(model))


# --------------------------------------------------------------------------- property tests
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_STRINGS = ["mlp", "vit", "lm", "mnist1d", "random_inputs", "text", "fashion_mnist", "relu", "gelu", "mixed(0.5)",
            "topk(3)", "sgd", "adam", "adamw", "cosine", "constant", "synapse", "exact", "none", "sample", "batch",
            "input", "output", "", "relu(", "topk(x)"]
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(_STRINGS), st.text(max_size=8),
                 st.lists(st.integers(-2, 2), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), st.floats()), max_size=2))
_KEYS = st.one_of(st.sampled_from(sorted(_FIELDS)), st.text(max_size=6), st.integers(-2, 2))


@settings(max_examples=300, **SETTINGS)
@given(base=st.booleans(), changes=st.dictionaries(_KEYS, _ANY, max_size=5))
def test_from_dict_raises_only_value_error(base, changes):
    d = {**(TrainConfig().to_dict() if base else {}), **changes}
    try:
        cfg = TrainConfig.from_dict(d)
    except ValueError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        return
    # accepted: it round-trips through JSON (config.json) to an equal, valid config
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@st.composite
def valid_configs(draw):
    model = draw(st.sampled_from(["mlp", "vit", "lm"]))
    heads = draw(st.integers(1, 4))
    d = {"model": model, "heads": heads, "width": heads * draw(st.integers(1, 16)),
         "data": {"mlp": draw(st.sampled_from(["mnist1d", "random_labels", "random_inputs", "fashion_mnist"])),
                  "vit": "fashion_mnist", "lm": "text"}[model],
         "activation": draw(st.sampled_from(["relu", "gelu", "relu2", "jsrelu", "mixed(0.25)", "topk(2)",
                                             "shifted_relu(0.5,0.1)", "sshaped(0.5,0,0)"])),
         "depth": draw(st.integers(1, 6)), "mlp_ratio": draw(st.integers(1, 8)), "seq_len": draw(st.integers(1, 64)),
         "optimizer": draw(st.sampled_from(["sgd", "adam", "adamw"])), "lr": draw(st.floats(1e-6, 10.0)),
         "momentum": draw(st.floats(0.0, 0.99)), "weight_decay": draw(st.floats(0.0, 1.0)),
         "schedule": draw(st.sampled_from(["constant", "cosine"])), "steps": draw(st.integers(2, 10**6)),
         "batch_size": draw(st.integers(1, 512)), "seed": draw(st.integers(0, 2**32 - 1)),
         "weight_noise": draw(st.sampled_from(["none", "synapse", "exact"])), "rho": draw(st.floats(0.0, 1.0)),
         "zeroth_bias": draw(st.booleans()), "restricted_ln": draw(st.booleans()),
         "log_every": draw(st.integers(1, 1000)), "checkpoint_every": draw(st.integers(0, 1000))}
    d["warmup"] = draw(st.integers(0, d["steps"] - 1))
    if model != "lm" and draw(st.booleans()):
        d["n_train"] = draw(st.integers(1, 4000))
    return d


@settings(max_examples=150, **SETTINGS)
@given(d=valid_configs())
def test_valid_configs_validate(d):
    cfg = TrainConfig.from_dict(d)
    assert all(getattr(cfg, k) == v for k, v in d.items())
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _flag_strategies():
    """(flag, strategy of its argv tail) for every option of `gradsparse train` except --out/--config."""
    garbage = st.text(alphabet="abcxyz0123456789.-e", min_size=0, max_size=6)
    out = []
    for a in _train_parser()._actions:
        flag = a.option_strings[-1] if a.option_strings else None
        if flag in (None, "--help", "--out", "--config", "--quiet"):
            continue
        if a.nargs == 0:
            out.append(st.just([flag]))
        elif a.choices:
            out.append(st.tuples(st.just(flag), st.one_of(st.sampled_from(list(a.choices)), garbage)).map(list))
        elif a.type is int:
            vals = st.one_of(st.integers(-3, 300).map(str), st.integers(-2**40, 2**40).map(str), garbage)
            out.append(st.tuples(st.just(flag), vals).map(list))
        elif a.type is float:
            vals = st.one_of(st.floats(-1.0, 2.0).map(repr), st.sampled_from(["nan", "inf", "-inf", "1e-3", "0"]),
                             garbage)
            out.append(st.tuples(st.just(flag), vals).map(list))
        else:
            out.append(st.tuples(st.just(flag), st.one_of(garbage, st.sampled_from(["README.md", "tests", "/"])))
                       .map(list))
    return out


_DATA = st.sampled_from([["--data", "random_inputs"], ["--model", "lm"], ["--data", "random_inputs", "--model", "vit"],
                         ["--data", "cifar"], ["--model", "lm", "--data", "random_inputs"]])


_cached_text = functools.lru_cache(maxsize=None)(gdata.load_text)
_cached_fashion = functools.lru_cache(maxsize=None)(gdata.load_fashion_mnist)


def _fake_mnist1d(seed=0, num_samples=5000):
    """mnist1d's shapes (4000/1000 x 40, 10 classes) without the seconds its generator takes."""
    rng = np.random.default_rng(seed)
    n_tr = num_samples * 4 // 5
    return Dataset("mnist1d", "vector", rng.standard_normal((n_tr, 40)).astype(np.float32),
                   rng.integers(0, 10, n_tr).astype(np.int32),
                   rng.standard_normal((num_samples - n_tr, 40)).astype(np.float32),
                   rng.integers(0, 10, num_samples - n_tr).astype(np.int32), 10)


@settings(max_examples=120, **SETTINGS)
@given(data=_DATA, flags=st.lists(st.one_of(*_flag_strategies()), max_size=6))
def test_train_command_never_tracebacks(tmp_path_factory, monkeypatch, data, flags):
    """Generated flags: argparse rejects (SystemExit 2), the command refuses (2, one line,
    nothing written), or it reaches training (stubbed here) with the config the flags give."""
    calls = []

    def fake_train(cfg, out, **kw):
        calls.append(cfg)
        return gtrain.RunResult(None, None, out, [], {"train_time_s": 0.0, "test_accuracy": 0.5})

    monkeypatch.setattr(train_cmd, "train", fake_train)
    monkeypatch.setattr(gdata, "load_text", _cached_text)
    monkeypatch.setattr(gdata, "load_fashion_mnist", _cached_fashion)
    monkeypatch.setattr(gdata, "make_mnist1d", _fake_mnist1d)
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = ["train", *data, *[x for f in flags for x in f], "--out", str(out), "--quiet"]
    try:
        code = main(argv)
    except SystemExit as e:
        assert e.code == 2
        return
    assert code in (0, 2)
    assert not out.exists()
    if code == 0:
        assert len(calls) == 1 and isinstance(calls[0], TrainConfig)


@settings(max_examples=4, **SETTINGS)
@given(steps=st.integers(1, 9), log_every=st.integers(1, 4), ckpt=st.integers(0, 4), seed=st.integers(0, 3))
def test_real_tiny_runs_write_what_they_promise(tmp_path_factory, steps, log_every, ckpt, seed):
    out = tmp_path_factory.mktemp("real") / "run"
    code = main(["train", *TINY, "--steps", str(steps), "--log-every", str(log_every), "--checkpoint-every", str(ckpt),
                 "--seed", str(seed), "--out", str(out)])
    assert code == 0
    logged = sorted({s for s in range(steps) if s % log_every == 0} | {steps - 1})
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == logged
    saved = sorted({s for s in range(1, steps) if ckpt and s % ckpt == 0} | {steps})
    assert [s for s, _ in list_checkpoints(out)] == saved
    assert json.loads((out / "config.json").read_text())["seed"] == seed
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

"""The finetuning route end to end: a tiny trained checkpoint -> `gradsparse finetune` -> reload."""

import json

import numpy as np
import pytest

from gradsparse.activations import Mixed
from gradsparse.checkpoint import load_checkpoint, load_model
from gradsparse.cli import main
from gradsparse.commands.finetune import parse_modules
from gradsparse.config import TrainConfig
from gradsparse.data import load_dataset
from gradsparse.plugins import SynapseNoise
from gradsparse.factory import RunKeys
from gradsparse.step import final_eval
from gradsparse.train import train

# log_every=1: every step is a monitored step, so only one train step is compiled per run
CFG = TrainConfig(width=16, depth=2, mlp_ratio=2, steps=12, batch_size=32, n_train=256, n_test=128, log_every=1,
                  eval_batch=64, checkpoint_every=0, lr=0.1)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    out = tmp_path_factory.mktemp("parent")
    train(CFG, out, progress=False)
    return out


def test_finetune_cli_end_to_end_and_reload(parent, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", str(parent), "--modules", "zeroth_bias,restricted_ln,jsrelu,lora,noise", "--steps", "5",
               "--t-up", "3", "--t-mix", "4", "--lora-rank", "2", "--rho", "0.05", "--log-every", "1",
               "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "density" in printed and "test accuracy" in printed and "zeroth_bias" in printed
    model, header = load_model(out)
    assert header["config"]["parent"].endswith("step_00000012.eqx")
    assert header["config"]["surgery"]["modules"] == ["zeroth_bias", "restricted_ln", "jsrelu", "noise", "lora"]
    assert header["config"]["steps"] == 5 and header["config"]["surgery"]["noise"] == "synapse"
    parent_model, _ = load_model(parent)
    for b, pb in zip(model.blocks, parent_model.blocks):
        assert isinstance(b.act, Mixed) and float(b.act.k) == 1.0          # 5 updates >= T_mix = 4
        assert np.all(np.abs(np.asarray(b.ln.weight)) >= 1.0)              # 5 updates >= T_up = 3
        np.testing.assert_array_equal(np.asarray(b.ln.bias), np.asarray(pb.ln.bias))  # shift frozen
        np.testing.assert_array_equal(np.asarray(b.key.weight), np.asarray(pb.key.weight))  # LoRA: base frozen
        assert b.key.lora_a.shape == (2, 16) and float(np.abs(np.asarray(b.key.lora_b)).max()) > 0
        assert np.all(np.abs(np.asarray(b.zeroth_bias)) <= 0.1 * np.abs(np.asarray(b.ln.weight)) + 1e-7)
        assert isinstance(b.noise, SynapseNoise) and b.noise.rho == 0.05
    # the reloaded model reproduces the run's final test accuracy, and the optimizer state reloads too
    summary = json.loads((out / "summary.json").read_text())
    cfg = TrainConfig.from_dict(header["config"])
    ds = load_dataset(cfg.data, seed=cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test)
    assert final_eval(model, ds, cfg.seq_len, RunKeys.of(cfg.seed).heldout)["test_accuracy"] == summary["test_accuracy"]
    _, opt_state, _ = load_checkpoint(out)
    assert opt_state is not None
    # a finetuned checkpoint is not finetuned again
    rc = main(["finetune", str(out), "--modules", "jsrelu", "--steps", "2", "--out", str(tmp_path / "again")])
    assert rc == 2 and "already a finetuned checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_unknown_module_is_a_one_line_error_and_writes_nothing(parent, tmp_path, capsys):
    out = tmp_path / "bad"
    rc = main(["finetune", str(parent), "--modules", "zeroth_bias,sparkle", "--steps", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "sparkle" in err
    assert "allowed: zeroth_bias, restricted_ln, jsrelu, noise, lora" in err
    assert not out.exists()


def test_parse_modules():
    assert parse_modules("none") == []
    assert parse_modules(" jsrelu , lora ") == ["jsrelu", "lora"]
    with pytest.raises(ValueError, match="twice"):
        parse_modules("lora,lora")
    with pytest.raises(ValueError, match="allowed"):
        parse_modules(",")


def test_finetune_resume(parent, tmp_path, capsys):
    """--resume continues a finetuning run; a restart before any checkpoint reproduces the same log."""
    args = ["finetune", str(parent), "--modules", "zeroth_bias,jsrelu", "--steps", "4", "--log-every", "1", "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--out", str(a)]) == 0
    assert main([*args, "--out", str(b)]) == 0
    # crash before the first checkpoint: only the config, meta and part of the log remain
    for p in (b / "checkpoints").iterdir():
        p.unlink()
    (b / "summary.json").unlink()
    lines = (b / "log.jsonl").read_text().splitlines()
    (b / "log.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    assert main([*args, "--out", str(b)]) == 2  # refused without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--out", str(b), "--resume"]) == 0
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "time"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(a / "log.jsonl") == strip(b / "log.jsonl")
    ma, _ = load_model(a)
    mb, _ = load_model(b)
    np.testing.assert_array_equal(np.asarray(ma.blocks[0].zeroth_bias), np.asarray(mb.blocks[0].zeroth_bias))
    # resuming a finished run with other arguments is refused
    assert main([*args[:-1], "--lr", "0.5", "--quiet", "--out", str(b), "--resume"]) == 2
    assert main([*args, "--out", str(b), "--resume", "--overwrite"]) == 2

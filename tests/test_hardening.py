"""The readers of model folders against hostile or careless input: names taken from a folder's
files stay inside it, symlinks (the Hugging Face cache) stay readable, damaged files are refused in
one line that shows none of their bytes, and non-finite weights are refused naming the tensor."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")

from safetensors.numpy import save_file  # noqa: E402
from tiny_bert import write_tiny_bert  # noqa: E402

from gradsparse import cli, weights  # noqa: E402
from gradsparse.models.bert import load_bert  # noqa: E402

#: what /etc/passwd starts with: read as a safetensors header length it is this integer
PASSWD = b"root:x:0:0:root:/root:/bin/bash\n"
PASSWD_INT = str(int.from_bytes(PASSWD[:8], "little"))


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [x for x in err.splitlines() if not x.startswith("spectrum: ")]  # the timing line of spectrum
    assert len(lines) == 1, err
    return lines[0]


def _sharded(folder: Path, wmap_rewrite: dict[str, str]) -> None:
    """A sharded tiny BERT whose weight_map entries for the first shard are rewritten."""
    write_tiny_bert(folder, sharded=True)
    idx = folder / "model.safetensors.index.json"
    index = json.loads(idx.read_text())
    index["weight_map"] = {k: wmap_rewrite.get(v, v) for k, v in index["weight_map"].items()}
    idx.write_text(json.dumps(index))


# ------------------------------------------------------------------------------------------ outside the folder
@pytest.mark.parametrize("shard", ["../mini/model.safetensors", "{abs}"])
def test_index_shard_outside_the_folder_is_refused_before_it_is_opened(tmp_path, capsys, shard):
    mini = tmp_path / "mini"
    write_tiny_bert(mini)  # a readable model outside the folder given
    shard = shard.format(abs=mini / "model.safetensors")
    folder = tmp_path / "m"
    _sharded(folder, {"model-00001-of-00002.safetensors": shard})
    for argv in (["measure", str(folder), "--no-gradients"], ["spectrum", str(folder), "--no-figures"],
                 ["spectrum", str(folder / "model.safetensors.index.json"), "--no-figures"]):
        assert cli.main(argv) == 2, argv
        err = _err(capsys)
        assert "points outside the model folder" in err and "sha256" not in err, err
    with pytest.raises(ValueError, match="points outside"):
        weights.read_tensors(folder)


def test_a_shard_pointing_at_etc_passwd_is_not_opened_and_no_bytes_are_shown(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    _sharded(folder, {"model-00001-of-00002.safetensors": "../../../../../../../../etc/passwd"})
    opened = []
    real_open = open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    assert cli.main(["spectrum", str(folder), "--no-figures"]) == 2
    err = _err(capsys)
    assert "points outside" in err and PASSWD_INT not in err
    assert not any("passwd" in f for f in opened)


def test_a_damaged_shard_inside_the_folder_shows_none_of_its_bytes(tmp_path, capsys):
    folder = tmp_path / "m"
    _sharded(folder, {})
    (folder / "model-00001-of-00002.safetensors").write_bytes(PASSWD * 4)
    assert cli.main(["spectrum", str(folder), "--no-figures"]) == 2
    err = _err(capsys)
    assert "not a readable .safetensors file" in err and PASSWD_INT not in err and "root:x" not in err
    (folder / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", 12) + b"\xff\xfe" * 6)
    assert cli.main(["spectrum", str(folder), "--no-figures"]) == 2
    err = _err(capsys)
    assert "not UTF-8 JSON" in err and "0xff" not in err and "xff" not in err


@pytest.mark.parametrize("path", ["../poolcfg", "/etc", "1_Pooling/../../poolcfg"])
def test_modules_json_pooling_path_outside_the_folder_is_refused(tmp_path, capsys, path):
    folder = tmp_path / "m"
    write_tiny_bert(folder)
    (tmp_path / "poolcfg").mkdir()
    (tmp_path / "poolcfg" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    mods = json.loads((folder / "modules.json").read_text())
    mods[1]["path"] = path
    (folder / "modules.json").write_text(json.dumps(mods))
    with pytest.raises(ValueError, match="points outside the model folder"):
        load_bert(folder)
    assert cli.main(["measure", str(folder), "--no-gradients"]) == 2
    assert "Pooling module's path" in _err(capsys)


def test_inside_folder_rules():
    f = Path("/models/m")
    assert weights.inside_folder(f, "a/./b.safetensors", "x") == f / "a" / "b.safetensors"
    assert weights.inside_folder(f, "a/../b.safetensors", "x") == f / "b.safetensors"
    for bad in ("../b", "/abs/b", "a/../../b", "", "  ", None, 3, "a\x00b", ".."):
        with pytest.raises(ValueError, match="x: "):
            weights.inside_folder(f, bad, "x")


def test_symlinked_files_stay_readable_as_in_the_hugging_face_cache(tmp_path, capsys):
    """snapshots/REV/* are symlinks into blobs/: the single file, the sharded index, its shards and
    the pooling folder all read, and give the same model as the plain folder."""
    plain = tmp_path / "plain"
    write_tiny_bert(plain, sharded=True)
    cache = tmp_path / "cache"
    blobs, snap = cache / "blobs", cache / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(plain.rglob("*")):
        if f.is_file():
            rel = f.relative_to(plain)
            blob = blobs / f"blob{len(list(blobs.iterdir()))}"
            shutil.copy(f, blob)
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    assert (snap / "model.safetensors.index.json").is_symlink()
    a, _, ia = load_bert(plain)
    b, _, ib = load_bert(snap)
    assert ia.weights_sha256 == ib.weights_sha256 and ia.pooling == ib.pooling
    assert np.array_equal(np.asarray(a.mlp_blocks()[0].key.weight), np.asarray(b.mlp_blocks()[0].key.weight))
    assert cli.main(["spectrum", str(snap), "--no-figures", "--no-fit"]) == 0
    # a symlinked single-file model too
    single = tmp_path / "single"
    write_tiny_bert(single)
    (tmp_path / "blob").write_bytes((single / "model.safetensors").read_bytes())
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").symlink_to(tmp_path / "blob")
    assert cli.main(["spectrum", str(single / "model.safetensors"), "--no-figures", "--no-fit"]) == 0
    load_bert(single)


# ------------------------------------------------------------------------------------------ non-finite weights
def _poison(folder: Path) -> None:
    from safetensors.numpy import load_file

    t = load_file(str(folder / "model.safetensors"))
    k = t["encoder.layer.0.intermediate.dense.weight"].copy()
    k[0, 0], k[3, 1] = np.nan, np.inf
    t["encoder.layer.0.intermediate.dense.weight"] = k
    save_file(t, str(folder / "model.safetensors"))


def test_measure_refuses_non_finite_weights_naming_the_tensor(tmp_path, capsys):
    folder = tmp_path / "m"
    write_tiny_bert(folder)
    _poison(folder)
    assert cli.main(["measure", str(folder), "--no-gradients"]) == 2
    err = _err(capsys)
    assert "encoder.layer.0.intermediate.dense.weight" in err and "2 NaN or inf" in err and str(folder) in err


def test_relufy_refuses_non_finite_weights_and_leaves_nothing_behind(tmp_path, capsys):
    folder = tmp_path / "m"
    write_tiny_bert(folder)
    _poison(folder)
    out = tmp_path / "run"
    argv = ["relufy", str(folder), "--steps", "2", "--out", str(out), "--batch-size", "4", "--quiet"]
    assert cli.main(argv) == 2
    err = _err(capsys)
    assert "encoder.layer.0.intermediate.dense.weight" in err and "NaN or inf" in err
    assert not out.exists() or not any(out.iterdir())

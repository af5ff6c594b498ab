"""The commands' contract on damaged or foreign input: one line, exit 2 for bad input (never exit 0
on failure), exit 3 for divergence, and messages that name the way out."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")

from safetensors.numpy import save_file  # noqa: E402

from gradsparse import cli, weights  # noqa: E402
from gradsparse.checkpoint import list_checkpoints  # noqa: E402

TRAIN = ["train", "--model", "mlp", "--data", "mnist1d", "--width", "8", "--depth", "1", "--n-train", "64",
         "--n-test", "32", "--batch-size", "8", "--eval-batch", "16", "--log-every", "2", "--quiet"]


def _err(capsys) -> str:
    """The one error line (spectrum's timing and skip lines aside)."""
    err = capsys.readouterr().err.strip()
    lines = [x for x in err.splitlines() if not x.startswith("spectrum: ")]
    assert len(lines) == 1, err
    return lines[0]


def _two_matrices(path: Path, names=("a.weight", "b.weight")) -> Path:
    rng = np.random.default_rng(0)
    save_file({n: rng.standard_normal((8, 6)).astype(np.float32) for n in names}, str(path))
    return path


@pytest.fixture(scope="module")
def train_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main([*TRAIN, "--steps", "6", "--checkpoint-every", "2", "--out", str(run)]) == 0
    return run


# ------------------------------------------------------------------------------------------ spectrum exit codes
def test_spectrum_on_a_truncated_safetensors_file_exits_2_with_the_sizes(tmp_path, capsys):
    f = _two_matrices(tmp_path / "w.safetensors")
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    f.write_bytes(data[:40])
    assert cli.main(["spectrum", str(f), "--no-figures"]) == 2
    assert f"{f} is truncated or damaged (40 bytes, its header needs {8 + n})" in _err(capsys)
    f.write_bytes(data[:-10])  # the header is whole, the data are not
    assert cli.main(["spectrum", str(f), "--no-figures"]) == 2
    err = _err(capsys)
    assert "truncated or damaged" in err and f"for a file of {len(data) - 10} bytes" in err


def test_spectrum_on_a_header_claiming_4_tib_in_a_100_byte_file_exits_2(tmp_path, capsys):
    rows = 1 << 20
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, rows], "data_offsets": [0, rows * rows * 4]}}).encode()
    f = tmp_path / "huge.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * (100 - 8 - len(header)))
    assert f.stat().st_size == 100
    assert cli.main(["spectrum", str(f), "--no-figures"]) == 2
    err = _err(capsys)
    assert "its header claims 4.0 TiB" in err and "for a file of 100 bytes" in err


def _fail_reading(monkeypatch, names, exc):
    """safe_open whose get_tensor raises ``exc`` for the tensors in ``names``."""
    real = weights.safe_open

    class Handle:
        def __init__(self, *a, **k):
            self.h = real(*a, **k)

        def __enter__(self):
            self.f = self.h.__enter__()
            return self

        def __exit__(self, *exc_info):
            return self.h.__exit__(*exc_info)

        def get_tensor(self, name):
            if name in names:
                raise exc
            return self.f.get_tensor(name)

    monkeypatch.setattr(weights, "safe_open", Handle)


def test_spectrum_fails_when_a_matrix_cannot_be_read_unless_allowed(tmp_path, capsys, monkeypatch):
    f = _two_matrices(tmp_path / "w.safetensors")
    _fail_reading(monkeypatch, {"a.weight"}, MemoryError())
    assert cli.main(["spectrum", str(f), "--no-figures"]) == 2
    err = _err(capsys)
    assert "1 of 2 matrices could not be read" in err and "not enough memory" in err and "--allow-unreadable" in err
    assert cli.main(["spectrum", str(f), "--no-figures", "--allow-unreadable"]) == 0
    assert "cannot read" in capsys.readouterr().out
    _fail_reading(monkeypatch, {"a.weight", "b.weight"}, MemoryError())
    assert cli.main(["spectrum", str(f), "--no-figures", "--allow-unreadable"]) == 2
    assert "no matrix could be analysed" in _err(capsys)


def test_raw_safetensors_errors_are_one_line_in_gradsparse_words(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    f = _two_matrices(tmp_path / "w.safetensors")
    raw = SafetensorError("Error while deserializing header: MetadataIncompleteBuffer")
    _fail_reading(monkeypatch, {"a.weight", "b.weight"}, raw)
    with pytest.raises(ValueError, match="does not follow the safetensors format") as e:
        weights.read_tensors(f)
    assert "deserializ" not in str(e.value) and "MetadataIncompleteBuffer" not in str(e.value)
    assert cli.main(["spectrum", str(f), "--no-figures"]) == 2
    err = _err(capsys)
    assert "deserializ" not in err and "safetensors format" in err


@pytest.mark.parametrize("content", [b"", np.random.default_rng(5).bytes(64), b"\x00" * 300],
                         ids=["empty", "random", "zeros"])
def test_a_bin_file_that_is_neither_zip_nor_pickle_is_not_a_readable_model_file(tmp_path, capsys, content):
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(content)
    if content[:1] == b"\x80" or content[:4] == b"PK\x03\x04":
        pytest.skip("random bytes that look like a pickle")
    assert cli.main(["spectrum", str(f), "--no-figures"]) == 2
    err = _err(capsys)
    assert "not a readable model file" in err and "needs torch" not in err


def test_symlink_loops_are_named(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    assert cli.main(["spectrum", str(loop), "--no-figures"]) == 2
    assert "symlink loop" in _err(capsys)
    pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")
    from tiny_bert import write_tiny_bert

    folder = tmp_path / "m"
    write_tiny_bert(folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("model.safetensors")
    assert cli.main(["spectrum", str(folder), "--no-figures"]) == 2
    assert "symlink loop" in _err(capsys)
    assert cli.main(["measure", str(folder), "--no-gradients"]) == 2
    assert "symlink loop" in _err(capsys)
    assert cli.main(["measure", str(loop), "--no-gradients"]) == 2
    assert "symlink loop" in _err(capsys)
    broken = tmp_path / "broken.safetensors"
    broken.symlink_to(tmp_path / "nowhere.safetensors")
    assert cli.main(["spectrum", str(broken), "--no-figures"]) == 2
    assert "broken symlink" in _err(capsys)


def test_a_300_character_tensor_name_gets_a_short_figure_name(tmp_path, capsys):
    long_name = "encoder." + "very_long_module_name." * 13 + "weight"
    assert len(long_name) > 290
    f = _two_matrices(tmp_path / "w.safetensors", names=(long_name, long_name[:-6] + "other"))
    out = tmp_path / "figs"
    assert cli.main(["spectrum", str(f), "--out", str(out), "--formats", "png", "--no-fit"]) == 0
    names = sorted(p.name for p in out.iterdir())
    esd = [n for n in names if n.startswith("esd_")]
    assert len(esd) == 2 and all(len(n.encode()) < 160 for n in esd)
    assert all(n.startswith("esd_encoder.very_long_module_name") for n in esd)
    assert weights.short_name(long_name) != weights.short_name(long_name[:-6] + "other")
    assert weights.short_name("short") == "short"


# ------------------------------------------------------------------------------------------ run folders
def test_train_that_diverges_at_step_1_hints_a_lower_lr_and_blocks_no_retry(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main([*TRAIN, "--steps", "4", "--lr", "1e30", "--out", str(run)]) == 3
    err = _err(capsys)
    assert "a lower --lr than 1e+30 may help" in err and "needs no --overwrite" in err
    assert not run.exists()
    assert cli.main([*TRAIN, "--steps", "4", "--out", str(run)]) == 0  # no --overwrite needed
    # beside someone else's files: only the run's own files go
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main([*TRAIN, "--steps", "4", "--lr", "1e30", "--out", str(other), "--overwrite"]) == 3
    capsys.readouterr()
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_resume_refusals_name_the_way_out(tmp_path, capsys, train_run):
    run = tmp_path / "run"
    shutil.copytree(train_run, run)
    (run / "config.json").write_text('{"model": "mlp", "steps": ')
    assert cli.main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = _err(capsys)
    assert "damaged" in err and "--overwrite starts the run over" in err
    shutil.rmtree(run)
    shutil.copytree(train_run, run)
    log = (run / "log.jsonl").read_bytes().split(b"\n")
    (run / "log.jsonl").write_bytes(b"\n".join(log[:1]) + b"\n")
    assert cli.main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = _err(capsys)
    assert "lost lines" in err and "--overwrite starts the run over" in err


def test_spectrum_of_a_run_skips_a_truncated_older_checkpoint(tmp_path, capsys, train_run):
    run = tmp_path / "run"
    shutil.copytree(train_run, run)
    cks = list_checkpoints(run)
    assert len(cks) >= 3
    older = cks[1][1]
    older.write_bytes(older.read_bytes()[:200])
    assert cli.main(["spectrum", str(run), "--formats", "png", "--max-esd", "0", "--no-fit"]) == 0
    err = capsys.readouterr().err
    assert "1 earlier checkpoints skipped" in err and older.name in err
    assert (run / "spectrum" / "ratio_vs_step.png").is_file()


def test_a_permission_error_on_the_default_out_names_the_flag(tmp_path, capsys, train_run, monkeypatch):
    import gradsparse.commands.spectrum as spectrum_cmd

    run = tmp_path / "run"
    shutil.copytree(train_run, run)

    def refuse(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(spectrum_cmd, "atomic_write_text", refuse)
    assert cli.main(["spectrum", str(run), "--formats", "png", "--no-fit"]) == 2
    err = _err(capsys)
    assert "default --out" in err and "pass --out DIR" in err and "Permission denied" in err


# ------------------------------------------------------------------------------------------ a relufication run
@pytest.fixture(scope="module")
def relufy_run(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")
    from tiny_bert import MAX_LEN, write_tiny_bert

    base = tmp_path_factory.mktemp("relufy")
    write_tiny_bert(base / "m")
    run = base / "run"
    assert cli.main(["relufy", str(base / "m"), "--steps", "2", "--out", str(run), "--batch-size", "4",
                     "--seq-len", str(MAX_LEN), "--log-every", "1", "--quiet"]) == 0
    return base / "m", run


def test_a_relufication_run_is_recognised_by_train_resume_and_spectrum(capsys, relufy_run):
    model, run = relufy_run
    capsys.readouterr()
    assert cli.main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = _err(capsys)
    assert "holds a relufication run" in err and f"gradsparse relufy {model.resolve()} --out {run} --resume" in err
    assert "unknown config keys" not in err
    assert cli.main(["spectrum", str(run), "--no-figures"]) == 2
    err = _err(capsys)
    assert "relufication run" in err and f"gradsparse spectrum {model.resolve()}" in err
    assert cli.main(["spectrum", str(list_checkpoints(run)[-1][1]), "--no-figures"]) == 2
    assert "relufication run" in _err(capsys)


def test_relufy_resume_of_a_training_run_names_train(capsys, tmp_path, train_run, relufy_run):
    model, _ = relufy_run
    run = tmp_path / "run"
    shutil.copytree(train_run, run)
    assert cli.main(["relufy", str(model), "--steps", "2", "--out", str(run), "--resume", "--quiet"]) == 2
    err = _err(capsys)
    assert "holds a training run" in err and f"gradsparse train --out {run} --resume" in err

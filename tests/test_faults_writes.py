"""Issue 23: every write that can meet a full disk says so and resumes; decoder archives are deterministic."""
from __future__ import annotations

import errno
import pathlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from covt import fs

REPO = Path(__file__).resolve().parents[1]


def full_disk_under(monkeypatch, folder: Path) -> None:
    """Writes of whole files under ``folder`` fail with ENOSPC, as on a full disk."""
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if Path(folder) in Path(self).parents:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def export_pidinet(folder: Path) -> list[str]:
    from test_faults_untrusted import write_tiny_pidinet_stage1  # tests/ is on sys.path under pytest

    return write_tiny_pidinet_stage1(folder)


def test_disk_full_while_exporting_a_decoder_is_named_and_a_rerun_writes_it(tmp_path, monkeypatch):
    decoders = tmp_path / "decoders"
    decoders.mkdir()
    full_disk_under(monkeypatch, decoders)
    with pytest.raises(fs.DiskFullError, match=r"disk full: no space left on device while writing "
                                               r".*decoders/pidinet_stage1.pt2 .*rerun the same command"):
        with fs.naming_disk_full(decoders):
            export_pidinet(decoders)
    assert list(decoders.iterdir()) == []  # no half archive, no temporary
    monkeypatch.undo()
    assert export_pidinet(decoders) == ["pidinet_stage1.pt2", "pidinet_stage1.json"]
    torch.export.load(str(decoders / "pidinet_stage1.pt2"))


def test_a_decoder_archive_is_the_same_bytes_whoever_writes_it(tmp_path):
    export_pidinet(tmp_path / "here")
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; "
            "from test_faults_untrusted import write_tiny_pidinet_stage1 as w; w(Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], cwd=REPO, check=True,
                   capture_output=True)
    for name in ("pidinet_stage1.pt2", "pidinet_stage1.json"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes(), name
    names = zipfile.ZipFile(tmp_path / "here" / "pidinet_stage1.pt2").namelist()
    assert {n.split("/")[0] for n in names} == {"archive"}  # not the writer's temporary file name


def test_a_safetensors_write_on_a_full_disk_is_named_disk_full(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as SafetensorError('... (os error 28)'): a LoRA merge or the heads export."""
    from safetensors import SafetensorError

    from trainer.export import write_atomically

    def write(tmp):
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at "
                              f"path {tmp / 'covt_heads.safetensors'}")

    with pytest.raises(fs.DiskFullError, match=r"disk full: .*final .*training resumes"):
        write_atomically(tmp_path / "final", write)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SafetensorError, match="os error 2\\)"):  # any other failure stays what it was
        with fs.naming_disk_full(tmp_path):
            raise SafetensorError("I/O error: No such file or directory (os error 2)")

import json
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from shards.inspect import main
from shards.reader import Cache


@pytest.fixture
def cache_copy(tmp_path, synthetic_cache):
    return shutil.copytree(synthetic_cache, tmp_path / "cache")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_summary_lists_samples_anchors_codecs_and_skipped_records(tmp_path, capsys, repo_root):
    from covt.config import DataConfig
    from tests.synthetic import write_synthetic_cache

    entries = json.loads((repo_root / "data/sample/conversations.json").read_text())
    entries.append({"id": "lost", "image": "missing.jpg", "conversations": entries[0]["conversations"]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    cfg = DataConfig(path=str(data), image_folder=str(repo_root / "data/sample/images"), on_bad_record="skip")
    cache = write_synthetic_cache(tmp_path / "c", cfg, ["sam", "siglip"], codecs={"siglip/embedding": "fp32"})
    code, out = run(capsys, cache)
    assert code == 0
    assert "samples  7  in 2 shards" in out
    assert re.search(r"sam\s+masks\s+8x32x32\s+bool\s+packbits", out)
    assert re.search(r"sam\s+embedding\s+32x8x8\s+float32\s+bf16\s+4.1 kB", out)
    assert re.search(r"siglip\s+embedding\s+32\s+float32\s+fp32\s+128 B\s+\S+ B\s+lossless", out)
    for needle in ("skipped records: 1", "image_missing: 1", "id='lost'", "missing.jpg"):
        assert needle in out, needle


def test_verify_passes_on_a_sound_cache(synthetic_cache, capsys):
    code, out = run(capsys, synthetic_cache, "--verify")
    assert code == 0 and "verify: OK (7 samples" in out and "PROBLEM" not in out


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_names_shard_and_sample_of_a_flipped_byte_in_a_tar(cache_copy, capsys):
    progress = json.loads((cache_copy / "progress/shard-000001.samples.json").read_text())
    victim = progress["samples"][1]  # second sample of shard 1
    image = victim["members"][1]
    flip(cache_copy / "samples/shard-000001.tar", image["offset"] + image["size"] // 2)
    code, out = run(capsys, cache_copy, "--verify")
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert any("samples/shard-000001.tar" in p and victim["key"] in p and image["name"] in p for p in problems), out
    assert not any("shard-000000" in p for p in problems)


def test_verify_names_the_sample_of_a_corrupt_tar_header(cache_copy, capsys):
    progress = json.loads((cache_copy / "progress/shard-000000.samples.json").read_text())
    victim = progress["samples"][2]
    flip(cache_copy / "samples/shard-000000.tar", victim["members"][0]["offset"] - 512 + 3)  # inside the name
    code, out = run(capsys, cache_copy, "--verify")
    assert code == 1
    assert any("shard-000000.tar" in line and victim["key"] in line and "header" in line
               for line in out.splitlines()), out


def test_verify_names_shard_file_and_sample_of_a_flipped_byte_in_a_zarr_shard(cache_copy, capsys):
    shard_file = cache_copy / "targets.zarr/depth/features/c/1/0/0/0"
    assert shard_file.is_file()
    flip(shard_file, 20)  # inside the first chunk: sample 4, the first of shard 1
    code, out = run(capsys, cache_copy, "--verify")
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert any("targets.zarr/depth/features/c/1/0/0/0" in p and "000000004" in p and "depth/features" in p
               for p in problems), out
    assert not any("000000005" in p for p in problems)


def test_verify_reports_a_missing_commit_record(cache_copy, capsys):
    (cache_copy / "progress/shard-000001.pidinet.json").unlink()
    code, out = run(capsys, cache_copy, "--verify")
    assert code == 1 and "shard-000001.pidinet.json" in out


def test_render_writes_a_readable_png_for_key_index_or_id(synthetic_cache, tmp_path, capsys):
    cache = Cache(synthetic_cache)
    for key in ("chelsea", "000000003", "6"):
        out = tmp_path / f"{key}.png"
        code, text = run(capsys, synthetic_cache, "--render", key, "-o", out)
        assert code == 0, text
        with Image.open(out) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 800 and img.height >= 600
            # not a blank canvas: the photo and colour maps put many colours on it
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 1000
    code, text = run(capsys, synthetic_cache, "--render", "nobody", "-o", tmp_path / "x.png")
    assert code == 2 and "nobody" in text
    assert cache.resolve("chelsea") in range(7)


def test_module_entry_point_takes_the_cache_dir_from_a_config(synthetic_cache, repo_root):
    proc = subprocess.run([sys.executable, "-m", "shards", "inspect", "--config", str(repo_root / "configs/tiny.yaml"),
                           f"cache.dir={synthetic_cache}"], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert str(synthetic_cache) in proc.stdout and "pidinet" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "shards", "inspect", str(repo_root)], cwd=repo_root,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a shards cache" in proc.stderr


def test_a_prediction_is_drawn_in_its_references_principal_components():
    import numpy as np

    from shards.inspect import pca_rgb

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(40, 6)) * np.array([5.0, 3.0, 2.0, 0.1, 0.1, 0.1])
    assert np.array_equal(pca_rgb(reference, reference), pca_rgb(reference))
    # the reference's rows in another order are drawn in the same colours, row for row
    order = rng.permutation(40)
    assert np.allclose(pca_rgb(reference[order], reference), pca_rgb(reference)[order])
    # without the reference, the prediction gets its own components and range (here: another colour scale)
    shrunk = reference * 0.5
    assert np.allclose(pca_rgb(shrunk), pca_rgb(reference))
    assert not np.allclose(pca_rgb(shrunk, reference), pca_rgb(reference))

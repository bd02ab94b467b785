"""``python -m shards inspect``: summarise a cache, verify every byte of it, render one sample.

    python -m shards inspect DIR                      # summary table
    python -m shards inspect DIR --verify             # checksums, counts, every sample readable
    python -m shards inspect DIR --render KEY -o x.png
    python -m shards inspect --config configs/tiny.yaml [cache.dir=...]   # DIR from the config
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from covt import fs
from covt.images import open_rgb
from shards import integrity, layout
from shards.codecs import get_codec, stored_suffix
from shards.integrity import DamagedSampleError, sample_name
from shards.reader import Cache, CacheError
from shards.storage import is_url


# --------------------------------------------------------------------- summary
def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(cache: Cache) -> str:
    m = cache.manifest
    tar_bytes = sum(s["bytes"] for s in m["shards"])
    out = [
        f"cache    {cache.location}  ({m['schema']})",
        f"samples  {m['num_samples']}  in {m['num_shards']} shards of up to {m['shard_size']}"
        f"  (tar {_size(tar_bytes)}, {_size(tar_bytes / max(m['num_samples'], 1))}/sample)"
        + (f"; subset of {m['subset']['size']} (seed {m['subset']['seed']})" if m.get("subset") else ""),
        f"created  {', '.join(f'{k} {v}' for k, v in m['created_by'].items() if v)}",
        "",
    ]
    rows = [["anchor", "array", "shape", "dtype", "codec", "stored/sample", "disk/sample", "max abs err", "rel L2 err",
             "compression"]]
    for anchor, a in m["anchors"].items():
        for name, info in a["arrays"].items():
            err = info["measured_error"]
            rows.append([anchor, name, "x".join(map(str, info["shape"])) or "scalar", info["dtype"], info["codec"],
                         _size(info["stored_bytes_per_sample"]), _size(info["disk_bytes_per_sample"]),
                         f"{err['max_abs']:.3g}" if err else "lossless", f"{err['rel_l2']:.3g}" if err else "-",
                         info["compression"]])
    out.append(_table(rows) if len(rows) > 1 else "anchors  none")
    out.append("")
    for anchor, a in m["anchors"].items():
        decoders = ", ".join(f"{d} ({_size(v['bytes'])})" for d, v in a["decoders"].items()) or "none"
        fp = json.dumps(a["fingerprint"], sort_keys=True)
        out.append(f"{anchor:<9}{a['tokens']} tokens; dims {a['dims']}; decoders: {decoders}")
        out.append(f"{'':<9}fingerprint {fp if len(fp) < 160 else fp[:157] + '...'}")
    bad = m["bad_records"]
    out.append("")
    out.append(f"skipped records: {bad['count']}" + (f"  ({', '.join(f'{k}: {v}' for k, v in bad['by_kind'].items())})"
                                                    if bad["count"] else ""))
    for b in bad["records"][:50]:
        out.append(f"  id={b['id']!r} (entry {b['source_index']}): {b['reason']}")
    if bad["count"] > 50:
        out.append(f"  ... and {bad['count'] - 50} more (manifest.json lists them all)")
    return "\n".join(out)


# ---------------------------------------------------------------------- verify
def _check_tar(cache: Cache, shard: dict, prog: dict, problems: list[str]) -> None:
    tar = cache.local_path(shard["tar"])
    if not tar.is_file():
        problems.append(f"{shard['tar']}: missing")
        return
    if fs.sha256_file(tar) == shard["sha256"]:
        return
    where_found = len(problems)
    raw = tar.read_bytes()
    if len(raw) != shard["bytes"]:
        problems.append(f"{shard['tar']}: {len(raw)} bytes, manifest says {shard['bytes']}")
    for s in prog["samples"]:
        for mem in s["members"]:
            header = layout.tar_header(mem["name"], mem["size"])
            if raw[mem["offset"] - len(header):mem["offset"]] != header:
                problems.append(f"{shard['tar']}: sample {s['key']} (id {s['id']!r}): tar header of "
                                f"{mem['name']} is corrupt")
    if len(problems) == where_found:
        problems.append(f"{shard['tar']}: sha256 differs from the manifest (damage in a member payload or the "
                        f"archive trailer; see the member checks)")


def _check_sample_bytes(cache: Cache, tar_rel: str, entry: dict, problems: list[str]) -> None:
    payloads = []
    for mem in entry["members"]:
        try:
            data = cache.member_bytes(entry, mem)
        except DamagedSampleError as e:
            problems.append(str(e))
            continue
        except (OSError, CacheError) as e:
            problems.append(f"{tar_rel}: sample {entry['key']} (id {entry['id']!r}): cannot read {mem['name']}: {e}")
            return
        payloads.append((mem["name"], data))
    for name, data in payloads:
        try:
            if name.endswith(".json"):
                json.loads(data)
            else:
                open_rgb(data)
        except Exception as e:
            problems.append(f"{tar_rel}: sample {entry['key']} (id {entry['id']!r}): {name} unreadable: {e}")


def _check_sample_targets(cache: Cache, entry: dict, progs: dict, problems: list[str]) -> None:
    for anchor, a in cache.manifest["anchors"].items():
        if anchor not in progs:
            continue
        for name, info in a["arrays"].items():
            parts = {}
            for sname in info["stored"]:
                try:
                    value = cache.stored_value(anchor, name, sname, entry["index"])
                except DamagedSampleError as e:
                    problems.append(str(e))
                    continue
                except Exception as e:
                    st = progs[anchor]["arrays"][name]["stored"][sname]
                    problems.append(f"{st['file']}: {sample_name(entry)} {anchor}/{sname}: unreadable: "
                                    f"{type(e).__name__}: {e}")
                    continue
                parts[stored_suffix(name, sname)] = value[None]
            if len(parts) == len(info["stored"]):
                get_codec(info["codec"], info["kind"]).decode(parts, tuple(info["shape"]))


def verify(cache: Cache, show_progress: bool = True) -> list[str]:
    """Every problem found, each naming the file and the sample; empty if the cache is sound."""
    m = cache.manifest
    problems = _manifest_and_decoder_problems(cache)
    next_index = 0
    bar = tqdm(total=m["num_samples"], desc="verifying", unit="sample", disable=not show_progress)
    for shard in m["shards"]:
        if shard["id"] + 1 < m["num_shards"]:
            cache.prefetch(shard["id"] + 1)  # a remote cache: the next shard downloads while this one is checked
        _verify_shard(cache, shard, next_index, problems, bar)
        next_index += shard["count"]
    bar.close()
    return problems


def _manifest_and_decoder_problems(cache: Cache) -> list[str]:
    m = cache.manifest
    problems: list[str] = [cache.manifest_problem] if cache.manifest_problem else []
    if layout.count_problem(m) and layout.count_problem(m) not in problems:
        problems.append(layout.count_problem(m))
    for anchor, a in m["anchors"].items():
        for d, info in a["decoders"].items():
            cache.local_path(f"{layout.DECODERS_DIR}/{d}")
            try:
                integrity.check_decoder(cache.cache_dir, d, info, anchor)
            except DamagedSampleError as e:
                problems.append(str(e))
    return problems


def _verify_shard(cache: Cache, shard: dict, first_index: int, problems: list[str], bar) -> None:
    """One shard: its commit records, tar, zarr shard files, and every sample's bytes and targets."""
    m, sid = cache.manifest, shard["id"]
    progs = {}
    for part in ["samples", *m["anchors"]]:
        try:
            progs[part] = cache.shard_progress(sid, part)
        except DamagedSampleError as e:
            problems.append(str(e))
    if "samples" not in progs:
        bar.update(shard["count"])
        return
    prog = progs["samples"]
    _check_tar(cache, shard, prog, problems)
    if len(prog["samples"]) != shard["count"] or prog["samples"][0]["index"] != first_index:
        problems.append(f"{shard['tar']}: holds {len(prog['samples'])} samples from index "
                        f"{prog['samples'][0]['index']}, expected {shard['count']} from {first_index}")
    for anchor in m["anchors"]:
        for array in progs.get(anchor, {"arrays": {}})["arrays"].values():
            for sname, st in array["stored"].items():
                path = cache.local_path(st["file"])
                if not path.is_file() or layout.checksum_file(path, st["checksum"]) != st["file_checksum"]:
                    problems.append(f"{st['file']}: zarr shard of shard {sid} ({anchor}/{sname}) "
                                    f"missing or checksum mismatch")
    for entry in prog["samples"]:
        _check_sample_bytes(cache, shard["tar"], entry, problems)
        _check_sample_targets(cache, entry, progs, problems)
        bar.update(1)


# ---------------------------------------------------------------------- render
def pca_rgb(features: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """``(n, d)`` -> ``(n, 3)`` in [0, 1]: the top 3 principal components, each stretched to its 1-99% range;
    with ``reference`` (``(m, d)``) the components, centre and range are the reference's, so that a prediction
    and its target are drawn in the same colours."""
    basis = (features if reference is None else reference).astype(np.float64)
    centre = basis.mean(axis=0, keepdims=True)

    def centred(x: np.ndarray) -> np.ndarray:
        x = x - centre
        return np.pad(x, ((0, 0), (0, max(0, 3 - x.shape[1]))))

    _, _, vt = np.linalg.svd(centred(basis), full_matrices=False)

    def components(x: np.ndarray) -> np.ndarray:
        comps = centred(x.astype(np.float64)) @ vt[:3].T
        return np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))

    reference_comps = components(basis)
    lo, hi = np.percentile(reference_comps, 1, axis=0), np.percentile(reference_comps, 99, axis=0)
    comps = reference_comps if reference is None else components(features)
    return np.clip((comps - lo) / np.maximum(hi - lo, 1e-8), 0, 1)


def _patch_grid(tokens: np.ndarray, prefer_prefix: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Drop leading non-patch tokens (CLS, registers) so the rest fills a square grid."""
    n = tokens.shape[0]
    for prefix in prefer_prefix:
        side = math.isqrt(max(n - prefix, 0))
        if side > 0 and side * side == n - prefix:
            return tokens[prefix:].reshape(side, side, -1), prefix
    return tokens.reshape(1, n, -1), 0


def pca_image(tokens: np.ndarray, prefer_prefix: tuple[int, ...],
              reference: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The patch tokens drawn by their top 3 principal components (those of ``reference``'s tokens if given)."""
    grid, prefix = _patch_grid(tokens, prefer_prefix)
    h, w, d = grid.shape
    basis = None if reference is None else reference[prefix:].reshape(h * w, d)
    return pca_rgb(grid.reshape(h * w, d), basis).reshape(h, w, 3), prefix


def _panels(sample: dict) -> list[tuple[str, callable]]:
    """(title, draw(ax)) for every panel of one sample."""
    from covt.images import square_view

    image = sample["images"][0]
    panels = [(f"image  id={sample['id']}  key={sample['key']}  {image.size[0]}x{image.size[1]}",
               lambda ax: ax.imshow(image))]
    colours = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]]) / 255.0

    def masks_overlay(ax, masks, count):
        view = square_view(image, masks.shape[-1]).astype(np.float64) / 255.0
        over = view.copy()
        for k in range(count):
            over[masks[k]] = 0.55 * over[masks[k]] + 0.45 * colours[k % len(colours)]
        ax.imshow(over)

    def imshow_bar(ax, arr, cmap):
        im = ax.imshow(arr, cmap=cmap)
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    from covt.anchors import ANCHORS

    order = sorted(sample["targets"], key=lambda a: list(ANCHORS).index(a) if a in ANCHORS else len(ANCHORS))
    for anchor in order:
        t = {k: v.numpy() for k, v in sample["targets"][anchor].items()}
        if anchor == "sam":
            count = int(t["mask_count"])
            panels.append((f"sam: {count} reference masks", lambda ax, m=t["masks"], c=count: masks_overlay(ax, m, c)))
            emb = t["embedding"]
            d, h, w = emb.shape
            panels.append((f"sam: image embedding {d}x{h}x{w} (PCA)",
                           lambda ax, e=emb: ax.imshow(pca_rgb(e.reshape(e.shape[0], -1).T).reshape(
                               e.shape[1], e.shape[2], 3))))
        elif anchor == "depth":
            panels.append(("depth: relative depth", lambda ax, a=t["depth"]: imshow_bar(ax, a, "magma")))
            for layer, feats in enumerate(t["features"]):
                img, _ = pca_image(feats, (0, 1, 5))
                panels.append((f"depth: layer {layer + 1}/{len(t['features'])} features (PCA)",
                               lambda ax, i=img: ax.imshow(i)))
        elif anchor == "dino":
            img, prefix = pca_image(t["features"], (1, 5, 0))
            panels.append((f"dino: patch features (PCA, {prefix} prefix token(s) dropped)",
                           lambda ax, i=img: ax.imshow(i)))
        elif anchor == "pidinet":
            panels.append(("pidinet: edges", lambda ax, a=t["edges"]: imshow_bar(ax, a, "inferno")))
        else:
            for name, arr in t.items():
                if arr.ndim == 1:
                    def bars(ax, a=arr):
                        ax.bar(np.arange(len(a)), a, width=1.0, color=np.where(a >= 0, "tab:blue", "tab:red"))
                        ax.set_xlim(-0.5, len(a) - 0.5)
                        ax.set_xlabel("dimension")
                    panels.append((f"{anchor}: {name} ({len(arr)}-d, |v|={np.linalg.norm(arr):.2f})", bars))
                elif arr.ndim == 2:
                    panels.append((f"{anchor}: {name}", lambda ax, a=arr: imshow_bar(ax, a, "viridis")))
    return panels


def render(cache: Cache, key: str | int, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = cache.resolve(key)
    sample = cache.sample(index)
    panels = _panels(sample)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, draw) in zip(axes.flat, panels):
        draw(ax)
        ax.set_title(title, fontsize=9)
        if not ax.get_xlabel():
            ax.set_xticks([]), ax.set_yticks([])
        else:
            ax.axis("on")
    fig.suptitle(f"{cache.location}  sample {sample['key']}", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="DIR | key.sub=value",
                   help="the cache directory, or config overrides when --config gives it")
    p.add_argument("--config", help="take the cache directory from this config's cache.dir")
    p.add_argument("--verify", action="store_true", help="check every checksum and count, read every sample")
    p.add_argument("--render", metavar="KEY", help="sample index, key or record id to draw")
    p.add_argument("-o", "--output", help="PNG to write with --render (default: sample-KEY.png)")
    p.add_argument("--local-dir", help="local copy of a cache at a URL (s3://...; default: cache.local_dir, "
                                       "else $COVT_CACHE_LOCAL or the temp dir)")
    a = p.parse_args(argv)
    dirs = [x for x in a.args if "=" not in x]
    overrides = [x for x in a.args if "=" in x]
    if len(dirs) > 1:
        p.error(f"one cache directory expected, got {dirs}")
    local = {}
    if dirs:
        cache_dir = dirs[0]
    else:
        from covt.config import ConfigError, load_config

        try:
            cache_cfg = load_config(a.config or "configs/tiny.yaml", overrides).cache
            cache_dir, local = cache_cfg.dir, cache_cfg.cache_kwargs()
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
    if a.local_dir:
        local["local_dir"] = a.local_dir
    with fresh_copy_to_verify(cache_dir, local, a.verify):
        return _inspect(cache_dir, local, a)


@contextmanager
def fresh_copy_to_verify(cache_dir: str, local: dict, verifying: bool):
    """A cache at a URL is verified from a new, empty local copy (removed afterwards), so every byte checked
    is what the store holds now: an older local copy would hide objects changed or deleted since."""
    if not (verifying and is_url(cache_dir)):
        yield
        return
    parent = local.get("local_dir") or None
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix="covt-verify-", dir=parent)
    local["local_dir"] = fresh
    try:
        yield
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def _inspect(cache_dir: str, local: dict, a: argparse.Namespace) -> int:
    try:
        cache = Cache(cache_dir, strict=False, **local)  # an edited manifest is summarised, and reported by --verify
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(cache))
    status = 0
    if a.verify:
        problems = verify(cache)
        print()
        for problem in problems:
            print(f"PROBLEM {problem}")
        if problems:
            print(f"verify: {len(problems)} problem(s) in {cache.location}")
            status = 1
        else:
            print(f"verify: OK ({cache.num_samples} samples, {cache.num_shards} shards, "
                  f"{len(cache.anchors)} anchors: every checksum matches, every sample readable)")
    if a.render is not None:
        try:
            out = render(cache, a.render, a.output or f"sample-{a.render}.png")
        except CacheError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"rendered sample {a.render} to {out}")
    return status

"""The issue's "done when": a folder mixing every bad case with good images goes through
download -> clean -> preprocess with exit 0, a report that accounts for every file, and tensors
that hold exactly the good images. Run through the real CLI (``python -m pipeline <stage>``) in
a scratch project directory, from the folder itself and from the same folder packed as a .zip and
as a .tar.gz that the local HTTP server serves (source ``archive`` with a pinned sha256). A fake
``gs`` first on PATH proves that Ghostscript never runs.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_http import Server, tar_gz, zip_bytes
from helpers_images import EPS, encode, ghostscript_trap, handmade_png, natural_image, path_with, psd_bytes
from PIL import Image

from pipeline.data.images import decode_image
from pipeline.data.preprocess import resize
from pipeline.data.tensors import load_split
from pipeline.io import sha256_bytes

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32

# Every file of the dirty folder and what must become of it: accepted (with repairs) or the reason.
GOOD = {f"{cls}/good_{i}.png": None for cls in ("cats", "dogs") for i in range(4)}
EXPECTED = {
    **{k: ("accepted", "") for k in GOOD},
    "cats/exif_rotated.jpg": ("accepted", "exif_orientation"),
    "cats/palette_transparent.png": ("accepted", "palette_expanded,alpha_composited"),
    "cats/rgba.png": ("accepted", "alpha_composited"),
    "dogs/la.png": ("accepted", "gray_to_rgb,alpha_composited"),
    "dogs/cmyk.jpg": ("accepted", "cmyk_converted"),
    "dogs/deep16.png": ("accepted", "16bit_scaled,gray_to_rgb"),
    "cats/zero.png": ("rejected", "empty"),
    "cats/truncated.jpg": ("rejected", "truncated"),
    "dogs/truncated.png": ("rejected", "truncated"),
    "dogs/random.jpg": ("rejected", "not_an_image"),
    "cats/notes.txt": ("rejected", "not_an_image"),
    "cats/vector.png": ("rejected", "format_not_allowed"),  # EPS content
    "dogs/layers.png": ("rejected", "format_not_allowed"),  # PSD content
    "dogs/bomb.png": ("rejected", "decompression_bomb"),  # 9000 x 9000 declared, a few kB on disk
    "cats/tiny.png": ("rejected", "too_small"),
    "dogs/animated.gif": ("rejected", "animated"),
    "cats/good_0_resaved.bmp": ("duplicate", "exact_duplicate"),  # good_0.png's pixels as BMP
    "dogs/good_1_reencoded.jpg": ("duplicate", "near_duplicate"),  # good_1.png as a JPEG
    "cats/.hidden.png": ("skipped", "hidden"),
    "README.txt": ("skipped", "outside_class_folders"),
}
LINK = {"dogs/link.png": ("skipped", "symlink_not_followed")}  # folders only: archives refuse links


def _make_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    seed = iter(range(100, 200))
    for name in GOOD:
        files[name] = encode(Image.fromarray(natural_image(next(seed), 48)[:, :40]), "PNG")
    stored = natural_image(next(seed), 48)[:30]  # 30 x 48, displayed rotated: 48 x 30
    exif = Image.Exif()
    exif[0x0112] = 6
    files["cats/exif_rotated.jpg"] = encode(Image.fromarray(stored), "JPEG", quality=92, exif=exif)
    pal = Image.fromarray(natural_image(next(seed), 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files["cats/palette_transparent.png"] = encode(pal, "PNG", transparency=3)
    rgba = np.dstack([natural_image(next(seed), 40), np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))])
    files["cats/rgba.png"] = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    la = np.dstack([np.asarray(Image.fromarray(natural_image(next(seed), 40)).convert("L")),
                    np.tile(np.linspace(40, 255, 40, dtype=np.uint8)[:, None], (1, 40))])
    files["dogs/la.png"] = encode(Image.fromarray(la, "LA"), "PNG")
    files["dogs/cmyk.jpg"] = encode(Image.fromarray(natural_image(next(seed), 40)).convert("CMYK"), "JPEG", quality=92)
    deep = (np.asarray(Image.fromarray(natural_image(next(seed), 40)).convert("L")).astype(np.uint16) * 257)
    files["dogs/deep16.png"] = encode(Image.fromarray(deep), "PNG")
    cut = encode(Image.fromarray(natural_image(next(seed), 64)), "JPEG")
    files["cats/zero.png"] = b""
    files["cats/truncated.jpg"] = cut[: len(cut) // 2]
    png = encode(Image.fromarray(natural_image(next(seed), 64)), "PNG")
    files["dogs/truncated.png"] = png[: len(png) // 2]
    files["dogs/random.jpg"] = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    files["cats/notes.txt"] = b"holiday pictures, see the other folder\n" * 10
    files["cats/vector.png"] = EPS
    files["dogs/layers.png"] = psd_bytes()
    files["dogs/bomb.png"] = handmade_png(9000, 9000, 1, 0)
    files["cats/tiny.png"] = encode(Image.fromarray(natural_image(next(seed), 6)), "PNG")
    frames = [Image.fromarray(natural_image(next(seed), 32)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    files["dogs/animated.gif"] = buf.getvalue()
    with Image.open(io.BytesIO(files["cats/good_0.png"])) as im:
        files["cats/good_0_resaved.bmp"] = encode(im, "BMP")
    with Image.open(io.BytesIO(files["dogs/good_1.png"])) as im:
        files["dogs/good_1_reencoded.jpg"] = encode(im, "JPEG", quality=95)
    files["cats/.hidden.png"] = files["cats/good_2.png"]
    files["README.txt"] = b"my pictures\n"
    assert set(files) == set(EXPECTED)
    return files


@pytest.fixture(scope="module")
def dirty_files() -> dict[str, bytes]:
    return _make_files()


def _folder(root: Path, files: dict[str, bytes], *, link: bool) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    if link:
        os.symlink(root / "dogs/good_0.png", root / "dogs/link.png")
    return root


PARAMS = {
    "channels": "rgb", "animated": "reject", "near_dup_distance": 4, "min_size": 8,
}


def _cli(project: Path, stage: str, gs_bin: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIPELINE_TRACKING": "0", "PYTHONPATH": str(ROOT), "PATH": path_with(gs_bin)}
    return subprocess.run([sys.executable, "-m", "pipeline", stage, "--params", "params.yaml"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def _project(tmp_path: Path, data: dict) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    preprocess = {"size": SIZE, "resize": "crop", "filter": "area", "test_fraction": 0.25}
    (project / "params.yaml").write_text(json.dumps({"data": {**PARAMS, **data}, "preprocess": preprocess}))
    return project


def _expected_tensors(files: dict[str, bytes]) -> list[tuple[bytes, int]]:
    """(pixels [3, 32, 32] as bytes, label) of every good image, decoded and resized independently."""
    out = []
    for name, (status, _) in EXPECTED.items():
        if status == "accepted":
            img = decode_image(files[name], channels="rgb", background=(255, 255, 255))
            px = resize(img.pixels, SIZE, policy="crop", filter="area", fill=0).transpose(2, 0, 1)
            out.append((np.ascontiguousarray(px).tobytes(), int(name.startswith("dogs/"))))
    return sorted(out)


def _check_run(project: Path, files: dict[str, bytes], expected: dict[str, tuple[str, str]], gs_bin: Path,
               marker: Path) -> None:
    for stage in ("download", "clean", "preprocess"):
        proc = _cli(project, stage, gs_bin)
        assert proc.returncode == 0, f"{stage} failed:\n{proc.stderr[-3000:]}"
    assert not marker.exists(), "Ghostscript ran"

    manifest = pd.read_parquet(project / "data/clean/manifest.parquet")
    got = {o: (s, r if s != "accepted" else rep) for o, s, r, rep in
           zip(manifest["origin"], manifest["status"], manifest["reason"], manifest["repairs"])}
    assert got == expected
    report = json.loads((project / "reports/clean_report.json").read_text())
    counts = {s: sum(v[0] == s for v in expected.values()) for s in ("accepted", "rejected", "duplicate", "skipped")}
    assert report["total"] == len(expected) == sum(counts.values())
    assert (report["accepted"], report["rejected"], report["duplicates"], report["skipped"]) == (
        counts["accepted"], counts["rejected"], counts["duplicate"], counts["skipped"])
    assert sum(report["rejected_by_reason"].values()) == report["rejected"]
    assert report["rejected_by_reason"]["truncated"] == 2 and report["rejected_by_reason"]["format_not_allowed"] == 2
    assert report["duplicates_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert report["repaired"]["alpha_composited"] == 3
    for reason, paths in report["examples"].items():
        assert all(expected[p][1] == reason for p in paths)

    meta = json.loads((project / "data/tensors/meta.json").read_text())
    assert meta["class_names"] == ["cats", "dogs"] and meta["image_shape"] == [3, SIZE, SIZE]
    tensors = [load_split(project / "data/tensors", split) for split in ("train", "test")]
    got_tensors = sorted((np.ascontiguousarray(x).tobytes(), int(y)) for t in tensors for x, y in zip(t.images, t.labels))
    assert got_tensors == _expected_tensors(files)


@pytest.fixture
def gs_trap(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, marker = ghostscript_trap(tmp_path / "trap")
    # Control: the fake gs is what runs for "gs" on that PATH, and it leaves the marker.
    subprocess.run(["gs", "-v"], env={**os.environ, "PATH": path_with(bin_dir)}, check=False)
    assert marker.exists()
    marker.unlink()
    return bin_dir, marker


def test_dirty_folder_through_download_clean_preprocess(tmp_path: Path, dirty_files: dict[str, bytes],
                                                        gs_trap: tuple[Path, Path]) -> None:
    folder = _folder(tmp_path / "my photos", dirty_files, link=True)
    project = _project(tmp_path, {"source": "folder", "path": str(folder)})
    _check_run(project, dirty_files, {**EXPECTED, **LINK}, *gs_trap)

    # The clean stage's run journal, which is what reaches MLflow, holds the report and its counts.
    journals = list((project / ".pipeline/tracking").glob("*-clean-*/journal.jsonl"))
    assert len(journals) == 1
    events = [json.loads(line) for line in journals[0].read_text().splitlines()]
    metrics = {k: v for e in events if e["type"] == "metrics" for k, v in e["metrics"].items()}
    report = json.loads((project / "reports/clean_report.json").read_text())
    assert metrics["total"] == report["total"] and metrics["rejected_truncated"] == 2
    assert metrics["skipped_symlink_not_followed"] == 1 and metrics["duplicate_near_duplicate"] == 1
    assert any(e["type"] == "artifact" and e["path"].endswith("clean_report.json") for e in events)


@pytest.mark.parametrize("packing", ["zip", "tar.gz"])
def test_dirty_folder_as_an_archive_from_the_server(tmp_path: Path, dirty_files: dict[str, bytes], server: Server,
                                                    gs_trap: tuple[Path, Path], packing: str) -> None:
    members = {f"my photos/{k}": v for k, v in dirty_files.items()}
    archive = zip_bytes(members) if packing == "zip" else tar_gz(members)
    server.files[f"photos.{packing}"] = archive
    project = _project(tmp_path, {"source": "archive", "path": f"{server.base}/files/photos.{packing}",
                                  "sha256": sha256_bytes(archive)})
    _check_run(project, dirty_files, EXPECTED, *gs_trap)
    assert server.hits("files") == [None]
    assert (project / "data/downloads" / f"photos.{packing}").read_bytes() == archive


def test_hostile_archive_is_refused_whole_by_the_cli(tmp_path: Path, server: Server, gs_trap: tuple[Path, Path]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        good = encode(Image.fromarray(natural_image(1, 16)), "PNG")
        ti = tarfile.TarInfo("photos/cats/a.png")
        ti.size = len(good)
        tf.addfile(ti, io.BytesIO(good))
        evil = tarfile.TarInfo("photos/../../escaped.png")
        evil.size = len(good)
        tf.addfile(evil, io.BytesIO(good))
    server.files["evil.tar.gz"] = buf.getvalue()
    project = _project(tmp_path, {"source": "archive", "path": f"{server.base}/files/evil.tar.gz",
                                  "sha256": sha256_bytes(buf.getvalue())})
    proc = _cli(project, "download", gs_trap[0])
    assert proc.returncode == 2, proc.stderr
    assert "refused archive" in proc.stderr and "'photos/../../escaped.png'" in proc.stderr
    assert "Nothing was extracted" in proc.stderr and "Traceback" not in proc.stderr
    assert not (project / "data/raw").exists() and not (tmp_path / "escaped.png").exists()
    assert not list((project / "data/downloads").glob("extracted-*"))

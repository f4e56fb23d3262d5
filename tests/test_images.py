"""Tests for pipeline.data.images: every outcome is produced by a real file written here.

Files are made with Pillow (or, where Pillow cannot write the case, byte by byte: 16-bit RGB
PNG, huge-but-tiny PNG bombs, EPS, PSD). Nothing in the module under test is mocked; where a
test changes the environment (PATH, a Pillow global), it says why and monkeypatch restores it.
"""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from helpers_images import (
    EPS,
    asymmetric_rgb,
    encode,
    ghostscript_trap,
    handmade_png,
    natural_image,
    path_with,
    psd_bytes,
    save,
)

from pipeline.data import images as images_mod
from pipeline.data.images import (
    ALLOWED_FORMATS,
    REJECT_REASONS,
    REPAIR_CODES,
    DecodedImage,
    ImageRejected,
    decode_image,
    hamming,
    near_duplicate_groups,
    perceptual_hash,
    pixel_hash,
)
from pipeline.errors import UserError

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def rejected(source: object, **kwargs: object) -> ImageRejected:
    kwargs.setdefault("channels", "rgb")
    with pytest.raises(ImageRejected) as info:
        decode_image(source, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason in REJECT_REASONS
    return info.value


# ----------------------------------------------------------------------------------------------
# API constants
# ----------------------------------------------------------------------------------------------


def test_allow_list_has_raster_formats_and_no_interpreters() -> None:
    assert ALLOWED_FORMATS == {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"}
    assert not ALLOWED_FORMATS & {"EPS", "PS", "PDF", "PSD", "WMF", "XPM"}
    for code, text in {**REJECT_REASONS, **REPAIR_CODES}.items():
        assert code and text and "\n" not in text


def test_image_rejected_is_not_a_user_error_and_pickles() -> None:
    exc = ImageRejected("truncated", "cut after 10 bytes")
    assert not isinstance(exc, UserError)
    back = pickle.loads(pickle.dumps(exc))
    assert (back.reason, back.detail) == ("truncated", "cut after 10 bytes")
    with pytest.raises(ValueError, match="unknown reject reason"):
        ImageRejected("no_such_reason", "x")


# ----------------------------------------------------------------------------------------------
# valid files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs", "lossless"),
    [
        ("PNG", {}, True),
        ("BMP", {}, True),
        ("TIFF", {}, True),
        ("PPM", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("JPEG", {"quality": 95, "subsampling": 0}, False),
    ],
)
def test_valid_rgb_formats_decode_to_hwc_uint8(tmp_path: Path, fmt: str, kwargs: dict, lossless: bool) -> None:
    arr = asymmetric_rgb() if lossless else natural_image(1, 32)[:16, :24]
    path = save(Image.fromarray(arr), tmp_path / f"img.{fmt.lower()}", fmt, **kwargs)
    out = decode_image(path, channels="rgb")
    assert out.pixels.shape == (16, 24, 3) and out.pixels.dtype == np.uint8
    assert out.pixels.flags.c_contiguous
    assert out.source_format == fmt and out.source_mode == "RGB" and out.source_size == (24, 16)
    assert out.repairs == ()
    if lossless:
        np.testing.assert_array_equal(out.pixels, arr)
    else:
        assert np.abs(out.pixels.astype(int) - arr).mean() < 3


def test_valid_gif_decodes_exact_palette_colours(tmp_path: Path) -> None:
    arr = np.zeros((16, 24, 3), np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:16] = (0, 255, 0)
    arr[4:8, :] = (10, 20, 30)
    path = save(Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), tmp_path / "a.gif", "GIF")
    out = decode_image(path, channels="rgb")
    assert out.source_format == "GIF" and out.source_mode == "P"
    assert out.repairs == ("palette_expanded",)
    np.testing.assert_array_equal(out.pixels, arr)


def test_bytes_source_equals_path_source(tmp_path: Path) -> None:
    arr = asymmetric_rgb()
    path = save(Image.fromarray(arr), tmp_path / "a.png", "PNG")
    from_path = decode_image(path, channels="rgb")
    from_bytes = decode_image(path.read_bytes(), channels="rgb")
    from_str = decode_image(str(path), channels="rgb")
    np.testing.assert_array_equal(from_path.pixels, from_bytes.pixels)
    np.testing.assert_array_equal(from_path.pixels, from_str.pixels)


def test_content_decides_format_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "really_a_jpeg.png"
    path.write_bytes(encode(Image.fromarray(asymmetric_rgb()), "JPEG"))
    assert decode_image(path, channels="rgb").source_format == "JPEG"


# ----------------------------------------------------------------------------------------------
# rejections
# ----------------------------------------------------------------------------------------------


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert rejected(path).reason == "empty"
    assert rejected(b"").reason == "empty"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM"])
def test_truncated_files_are_rejected(tmp_path: Path, fmt: str) -> None:
    data = encode(Image.fromarray(natural_image(2, 64)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert rejected(path).reason == "truncated"
    # The intact file decodes, so it is the cut that is detected.
    assert decode_image(data, channels="rgb").pixels.shape == (64, 64, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncation_is_an_error_even_if_someone_set_load_truncated_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    data = encode(Image.fromarray(natural_image(3, 64)), fmt)
    cut = data[: len(data) * 2 // 3]
    # Another library in the process switched Pillow to "pad truncated images silently".
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    # Control: with that flag, plain Pillow does load the cut file without complaint.
    with Image.open(io.BytesIO(cut)) as im:
        im.load()
    assert rejected(cut).reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_random_bytes_are_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert rejected(path).reason == "not_an_image"


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("These are my holiday pictures, see the folder next door.\n" * 20)
    assert rejected(path).reason == "not_an_image"


def test_pdf_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "doc.png"
    path.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    assert rejected(path).reason in {"not_an_image", "format_not_allowed"}


def test_eps_named_png_is_refused_without_running_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir, marker = ghostscript_trap(tmp_path)
    monkeypatch.setenv("PATH", path_with(bin_dir))
    # Pillow caches whether it found Ghostscript; make it look again (restored after the test).
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    path = tmp_path / "photo.png"
    path.write_bytes(EPS)

    exc = rejected(path)
    assert exc.reason == "format_not_allowed"
    assert "EPS" in exc.detail
    assert not marker.exists()

    # Control: unrestricted Pillow does run "gs" for this very file, so the trap works.
    with pytest.raises(Exception):  # noqa: B017 - whatever the fake gs makes Pillow raise
        with Image.open(path) as im:
            im.load()
    assert marker.exists()


def test_psd_named_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "layered.png"
    path.write_bytes(psd_bytes())
    with Image.open(path) as im:  # control: Pillow would parse it as PSD if allowed
        assert im.format == "PSD"
    exc = rejected(path)
    assert exc.reason == "format_not_allowed" and "PSD" in exc.detail


def test_allowed_signature_with_broken_header_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dJUNK" + bytes(40))
    exc = rejected(path)
    assert exc.reason == "unreadable" and "PNG" in exc.detail


def test_corrupt_compressed_data_is_unreadable(tmp_path: Path) -> None:
    data = bytearray(encode(Image.fromarray(natural_image(4, 64)), "PNG"))
    idat = data.index(b"IDAT")
    for k in range(idat + 40, idat + 80):
        data[k] ^= 0xFF  # same length, garbled zlib stream (and CRC)
    path = tmp_path / "garbled.png"
    path.write_bytes(bytes(data))
    assert rejected(path).reason == "unreadable"


def test_directory_fifo_and_missing_file(tmp_path: Path) -> None:
    assert rejected(tmp_path).reason == "not_a_file"
    assert rejected(tmp_path / "missing.png").reason == "unreadable"
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.png"
        os.mkfifo(fifo)
        assert rejected(fifo).reason == "not_a_file"  # and it returned: the open did not block


def test_bomb_above_twice_pillow_limit_is_rejected_from_the_header(tmp_path: Path) -> None:
    # 14000 x 14000 = 196 M pixels > 2 * 89.5 M: Pillow raises DecompressionBombError at open.
    # As a 1-bit PNG of zeros it is ~25 kB on disk.
    path = tmp_path / "bomb.png"
    path.write_bytes(handmade_png(14000, 14000, 1, 0))
    assert path.stat().st_size < 100_000
    before = (list(warnings.filters), Image.MAX_IMAGE_PIXELS)
    exc = rejected(path, max_pixels=10**12)
    assert exc.reason == "decompression_bomb"
    assert (list(warnings.filters), Image.MAX_IMAGE_PIXELS) == before


def test_bomb_warning_is_an_error(tmp_path: Path) -> None:
    # 10000 x 10000 = 100 M pixels: between Pillow's warning (89.5 M) and error (179 M) limits.
    path = tmp_path / "warned.png"
    path.write_bytes(handmade_png(10000, 10000, 1, 0))
    # Control: plain Pillow only *warns* for this file and would go on to decode it.
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()
    before = list(warnings.filters)
    assert rejected(path, max_pixels=10**12).reason == "decompression_bomb"
    assert list(warnings.filters) == before


def test_max_pixels_is_honoured_on_a_normal_image(tmp_path: Path) -> None:
    path = save(Image.fromarray(asymmetric_rgb(64, 64)), tmp_path / "a.png", "PNG")
    exc = rejected(path, max_pixels=64 * 64 - 1)
    assert exc.reason == "decompression_bomb" and "4096" in exc.detail
    assert decode_image(path, channels="rgb", max_pixels=64 * 64).pixels.shape == (64, 64, 3)


def test_too_small(tmp_path: Path) -> None:
    thin = save(Image.new("RGB", (20, 5)), tmp_path / "thin.png", "PNG")
    assert rejected(thin).reason == "too_small"
    assert rejected(thin, min_size=6).reason == "too_small"
    assert decode_image(thin, channels="rgb", min_size=5).pixels.shape == (5, 20, 3)
    square = save(Image.new("RGB", (8, 8)), tmp_path / "eight.png", "PNG")
    assert decode_image(square, channels="rgb").pixels.shape == (8, 8, 3)


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), colour) for colour in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]


@pytest.mark.parametrize(("fmt", "kwargs"), [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})])
def test_animated_files_under_both_policies(tmp_path: Path, fmt: str, kwargs: dict) -> None:
    frames = _frames()
    path = save(frames[0], tmp_path / f"anim.{fmt.lower()}", fmt, save_all=True, append_images=frames[1:], **kwargs)
    exc = rejected(path, animated="reject")
    assert exc.reason == "animated" and "3 frames" in exc.detail
    out = decode_image(path, channels="rgb", animated="first_frame")
    assert "first_frame_of_animation" in out.repairs
    assert out.pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(out.pixels[8, 8], (200, 10, 10))


def test_multi_picture_jpeg_goes_through_the_animated_policy(tmp_path: Path) -> None:
    # Phone cameras write MPO: a JPEG with extra pictures, opened by Pillow's JPEG plugin.
    frames = _frames()
    path = save(frames[0], tmp_path / "stereo.jpg", "MPO", save_all=True, append_images=frames[1:2], quality=95)
    out = decode_image(path, channels="rgb")
    assert out.source_format == "MPO" and out.repairs == ("first_frame_of_animation",)
    assert np.abs(out.pixels[8, 8].astype(int) - (200, 10, 10)).max() <= 8
    assert rejected(path, animated="reject").reason == "animated"


def test_still_image_is_not_animated(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (16, 16), (1, 2, 3)), tmp_path / "still.gif", "GIF")
    assert "first_frame_of_animation" not in decode_image(path, channels="rgb", animated="reject").repairs


# ----------------------------------------------------------------------------------------------
# repairs
# ----------------------------------------------------------------------------------------------


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, grey, with a red block in the stored top-left corner.
    stored = np.full((20, 40, 3), 128, np.uint8)
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(Image.fromarray(stored), tmp_path / "phone.jpg", "JPEG", quality=95, exif=exif)
    out = decode_image(path, channels="rgb")
    assert out.repairs == ("exif_orientation",)
    assert out.source_size == (40, 20)  # as stored
    assert out.pixels.shape == (40, 20, 3)  # as displayed: portrait
    # Rotating clockwise moves the stored top-left corner to the displayed top-right corner.
    assert out.pixels[3, 16, 0] > 200 and out.pixels[3, 16, 1] < 60
    assert abs(int(out.pixels[3, 3, 0]) - 128) < 20 and abs(int(out.pixels[36, 3, 0]) - 128) < 20


def test_exif_orientation_1_records_nothing(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    path = save(Image.new("RGB", (40, 20), (9, 9, 9)), tmp_path / "upright.jpg", "JPEG", exif=exif)
    out = decode_image(path, channels="rgb")
    assert out.repairs == () and out.pixels.shape == (20, 40, 3)


def test_corrupt_exif_is_kept_as_warning_not_rejection(tmp_path: Path) -> None:
    # An IFD entry for tag 274 whose data offset points past the end of the EXIF block.
    bad_exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\xff\xff\xff\xff\x00\x06\x00\x00"
    path = save(Image.new("RGB", (20, 10), (1, 2, 3)), tmp_path / "odd.jpg", "JPEG", exif=bad_exif)
    out = decode_image(path, channels="rgb")
    assert out.pixels.shape == (10, 20, 3) and out.warnings
    # The outcome must not depend on the caller's warning filters.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = decode_image(path, channels="rgb")
    assert again.warnings == out.warnings


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([200, 100, 50, 0, 255, 0, 1, 2, 3])
    im.paste(1, (0, 0, 8, 16))  # left half index 1 (fully transparent), right half index 0
    im.paste(2, (0, 0, 16, 2))  # top rows index 2 (alpha 128)
    path = save(im, tmp_path / "pal.png", "PNG", transparency=bytes([255, 0, 128]))
    bg = (10, 20, 30)
    out = decode_image(path, channels="rgb", background=bg)
    assert out.source_mode == "P"
    assert out.repairs == ("palette_expanded", "alpha_composited")
    np.testing.assert_array_equal(out.pixels[8, 12], (200, 100, 50))  # opaque
    np.testing.assert_array_equal(out.pixels[8, 3], bg)  # fully transparent -> background
    expected = [int(np.floor((c * 128 + b * 127) / 255 + 0.5)) for c, b in zip((1, 2, 3), bg)]
    np.testing.assert_array_equal(out.pixels[0, 5], expected)


def test_palette_without_transparency_is_only_expanded(tmp_path: Path) -> None:
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 7, 77, 177])
    out = decode_image(save(im, tmp_path / "pal.png", "PNG"), channels="rgb")
    assert out.repairs == ("palette_expanded",)
    assert (out.pixels == (7, 77, 177)).all()


def test_rgba_partial_alpha_composited_with_exact_rounding(tmp_path: Path) -> None:
    alphas = np.array([0, 1, 2, 127, 128, 129, 200, 254, 255], dtype=np.uint8)
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., 0] = 250
    rgba[..., 1] = np.arange(9, dtype=np.uint8) * 29
    rgba[..., 2] = 3
    rgba[..., 3] = alphas
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png", "PNG")
    bg = np.array([17, 255, 100])
    out = decode_image(path, channels="rgb", background=tuple(int(v) for v in bg))
    assert out.source_mode == "RGBA" and out.repairs == ("alpha_composited",)
    c = rgba[..., :3].astype(np.float64)
    a = rgba[..., 3:].astype(np.float64)
    expected = np.floor((c * a + bg * (255 - a)) / 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out.pixels, expected)
    # gray policy: composite first, then the same luma as Pillow's convert("L").
    gray = decode_image(path, channels="gray", background=tuple(int(v) for v in bg))
    assert gray.repairs == ("alpha_composited", "rgb_to_gray")
    np.testing.assert_array_equal(gray.pixels[..., 0], np.asarray(Image.fromarray(expected).convert("L")))


def test_rgba_fully_opaque_just_drops_alpha(tmp_path: Path) -> None:
    rgba = np.dstack([asymmetric_rgb(), np.full((16, 24), 255, np.uint8)])
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / "opaque.png", "PNG")
    out = decode_image(path, channels="rgb", background=(1, 2, 3))
    assert out.repairs == ()
    np.testing.assert_array_equal(out.pixels, asymmetric_rgb())


def test_la_composited_in_gray_and_rgb(tmp_path: Path) -> None:
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 240
    la[..., 1] = 255
    la[:4, :, 1] = 64
    path = save(Image.fromarray(la, "LA"), tmp_path / "la.png", "PNG")
    bg = (255, 0, 0)
    bg_luma = int(np.asarray(Image.new("RGB", (1, 1), bg).convert("L"))[0, 0])  # 76
    gray = decode_image(path, channels="gray", background=bg)
    assert gray.source_mode == "LA" and gray.repairs == ("alpha_composited",)
    assert gray.pixels[6, 6, 0] == 240
    assert gray.pixels[0, 0, 0] == int(np.floor((240 * 64 + bg_luma * 191) / 255 + 0.5))
    rgb = decode_image(path, channels="rgb", background=bg)
    assert rgb.repairs == ("gray_to_rgb", "alpha_composited")
    np.testing.assert_array_equal(rgb.pixels[6, 6], (240, 240, 240))
    expected = [int(np.floor((240 * 64 + b * 191) / 255 + 0.5)) for b in bg]
    np.testing.assert_array_equal(rgb.pixels[0, 0], expected)


@pytest.mark.parametrize(("fmt", "tolerance"), [("JPEG", 8), ("TIFF", 0)])
def test_cmyk_converted(tmp_path: Path, fmt: str, tolerance: int) -> None:
    path = save(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), tmp_path / f"cmyk.{fmt.lower()}", fmt)
    out = decode_image(path, channels="rgb")
    assert out.source_mode == "CMYK" and out.repairs == ("cmyk_converted",)
    assert np.abs(out.pixels[8, 8].astype(int) - (255, 0, 255)).max() <= tolerance


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_gray_is_scaled_not_clipped(tmp_path: Path, fmt: str) -> None:
    values = np.array([[0, 255, 256, 32768, 65280, 65535, 1000, 40000]] * 8, dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / f"deep.{fmt.lower()}", fmt)
    out = decode_image(path, channels="gray")
    assert out.source_mode.startswith("I;16") and out.repairs == ("16bit_scaled",)
    np.testing.assert_array_equal(out.pixels[0, :, 0], [0, 0, 1, 128, 255, 255, 3, 156])
    rgb = decode_image(path, channels="rgb")
    assert rgb.repairs == ("16bit_scaled", "gray_to_rgb")
    np.testing.assert_array_equal(rgb.pixels[0, 3], (128, 128, 128))


def test_16bit_ppm_is_scaled(tmp_path: Path) -> None:
    samples = np.array([0, 32768, 65535, 512] * 16, dtype=">u2").reshape(8, 8)
    path = tmp_path / "deep.pgm"
    path.write_bytes(b"P5\n8 8\n65535\n" + samples.tobytes())
    out = decode_image(path, channels="gray")
    assert out.source_format == "PPM" and "16bit_scaled" in out.repairs
    np.testing.assert_array_equal(out.pixels[0, :4, 0], [0, 128, 255, 2])


def test_16bit_rgb_png_is_scaled_and_recorded(tmp_path: Path) -> None:
    samples = np.zeros((8, 8, 3), dtype=">u2")
    samples[...] = (65535, 32768, 255)
    rows = b"".join(b"\x00" + samples[y].tobytes() for y in range(8))
    path = tmp_path / "deep_rgb.png"
    path.write_bytes(handmade_png(8, 8, 16, 2, rows))
    out = decode_image(path, channels="rgb")
    assert out.repairs == ("16bit_scaled",)
    np.testing.assert_array_equal(out.pixels[0, 0], (255, 128, 0))


def test_float_tiff_is_mapped_from_unit_range(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan, 0.25, 1e-3]] * 8, dtype=np.float32)
    path = save(Image.fromarray(values, "F"), tmp_path / "float.tif", "TIFF")
    out = decode_image(path, channels="gray")
    assert out.source_mode == "F" and out.repairs == ("float_scaled",)
    np.testing.assert_array_equal(out.pixels[0, :, 0], [0, 128, 255, 255, 0, 0, 64, 0])


def test_1bit_expanded(tmp_path: Path) -> None:
    bits = np.zeros((8, 8), bool)
    bits[:, 4:] = True
    path = save(Image.fromarray(bits), tmp_path / "bw.png", "PNG")
    out = decode_image(path, channels="gray")
    assert out.source_mode == "1" and out.repairs == ("1bit_expanded",)
    np.testing.assert_array_equal(out.pixels[0, :, 0], [0, 0, 0, 0, 255, 255, 255, 255])


def test_channel_policies(tmp_path: Path) -> None:
    gray_arr = (np.arange(16 * 24).reshape(16, 24) % 256).astype(np.uint8)
    gray_path = save(Image.fromarray(gray_arr), tmp_path / "g.png", "PNG")
    g = decode_image(gray_path, channels="gray")
    assert g.repairs == () and g.pixels.shape == (16, 24, 1)
    np.testing.assert_array_equal(g.pixels[..., 0], gray_arr)
    g3 = decode_image(gray_path, channels="rgb")
    assert g3.repairs == ("gray_to_rgb",) and g3.pixels.shape == (16, 24, 3)
    np.testing.assert_array_equal(g3.pixels, np.repeat(gray_arr[..., None], 3, axis=-1))

    rgb_arr = asymmetric_rgb()
    rgb_path = save(Image.fromarray(rgb_arr), tmp_path / "c.png", "PNG")
    c = decode_image(rgb_path, channels="gray")
    assert c.repairs == ("rgb_to_gray",) and c.pixels.shape == (16, 24, 1)
    # ITU-R 601-2 luma, within Pillow's fixed-point rounding.
    luma = rgb_arr[..., 0] * 0.299 + rgb_arr[..., 1] * 0.587 + rgb_arr[..., 2] * 0.114
    assert np.abs(c.pixels[..., 0].astype(float) - luma).max() <= 1.0
    np.testing.assert_array_equal(c.pixels[..., 0], np.asarray(Image.fromarray(rgb_arr).convert("L")))


def test_bad_arguments_are_programmer_errors(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(ValueError):
        decode_image(data, channels="rgba")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decode_image(data, channels="rgb", background=(0, 0, 256))
    with pytest.raises(ValueError):
        decode_image(data, channels="rgb", animated="loop")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decode_image(12345, channels="rgb")  # type: ignore[arg-type]
    # A list (as read from params.yaml) or numpy ints are fine.
    ok = decode_image(data, channels="rgb", background=[0, np.uint8(1), 2])  # type: ignore[arg-type]
    assert ok.pixels.shape == (8, 8, 3)


def test_no_global_state_leaks(tmp_path: Path) -> None:
    before = (list(warnings.filters), Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    good = encode(Image.fromarray(asymmetric_rgb()), "PNG")
    for source in (good, good[:100], b"junk" * 10, EPS):
        try:
            decode_image(source, channels="gray")
        except ImageRejected as exc:
            assert exc.reason in REJECT_REASONS
    assert (list(warnings.filters), Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def _decode_in_worker(data: bytes) -> tuple[DecodedImage | None, ImageRejected | None]:
    try:
        return images_mod.decode_image(data, channels="rgb"), None
    except images_mod.ImageRejected as exc:
        return None, exc


def test_decode_in_a_spawned_worker_process() -> None:
    good = encode(Image.fromarray(asymmetric_rgb()), "PNG")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        (ok, none), (none2, rej) = pool.map(_decode_in_worker, [good, good[:60]])
    assert none is None and none2 is None
    assert ok is not None and ok.source_format == "PNG"
    np.testing.assert_array_equal(ok.pixels, asymmetric_rgb())
    assert rej is not None and rej.reason == "truncated"


# ----------------------------------------------------------------------------------------------
# hashes
# ----------------------------------------------------------------------------------------------


def test_pixel_hash_same_picture_png_and_bmp(tmp_path: Path) -> None:
    arr = asymmetric_rgb()
    png = decode_image(save(Image.fromarray(arr), tmp_path / "a.png", "PNG"), channels="rgb")
    bmp = decode_image(save(Image.fromarray(arr), tmp_path / "a.bmp", "BMP"), channels="rgb")
    assert pixel_hash(png.pixels) == pixel_hash(bmp.pixels)
    changed = arr.copy()
    changed[5, 7, 1] ^= 1
    assert pixel_hash(changed) != pixel_hash(arr)
    flat = arr.reshape(16 * 24 * 3)
    assert pixel_hash(flat) != pixel_hash(arr)  # same bytes, different shape
    assert pixel_hash(arr[:, ::-1]) == pixel_hash(np.ascontiguousarray(arr[:, ::-1]))  # layout-independent


def test_perceptual_hash_survives_jpeg_reencoding_and_separates_images() -> None:
    a = natural_image(10)
    b = natural_image(11)
    a_jpeg = decode_image(encode(Image.fromarray(a), "JPEG", quality=90), channels="rgb").pixels
    ha, ha_jpeg, hb = perceptual_hash(a), perceptual_hash(a_jpeg), perceptual_hash(b)
    assert ha == ha_jpeg
    assert hamming(ha, hb) > 16
    assert 0 <= ha < 2**64
    # Gray input equals the luma of the RGB input.
    gray = np.asarray(Image.fromarray(a).convert("L"))
    assert perceptual_hash(gray) == perceptual_hash(gray[..., None]) == ha
    big = perceptual_hash(a, hash_size=16)
    assert 2**200 < big < 2**256
    # A resized copy stays close.
    half = np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.LANCZOS))
    assert hamming(perceptual_hash(half), ha) <= 4


def test_perceptual_hash_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        perceptual_hash(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError):
        perceptual_hash(np.zeros((8, 8, 4), np.uint8))


def test_hamming() -> None:
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(0, 2**64 - 1) == 64
    with pytest.raises(ValueError):
        hamming(-1, 0)


def test_near_duplicate_groups_known_structure() -> None:
    a = 0x0123456789ABCDEF
    b = a ^ 0b11  # 2 bits from a
    c = a ^ (0b1111 << 20)  # 4 bits from a, 6 from b
    d = c ^ (0b11 << 40)  # 2 bits from c, 6 from a: a chain a - c - d
    e = 0xFEDCBA9876543210  # far from everything
    hashes = [a, b, c, d, e, a, e ^ 1]
    assert near_duplicate_groups(hashes, max_distance=0) == [0, 1, 2, 3, 4, 0, 6]
    assert near_duplicate_groups(hashes, max_distance=2) == [0, 0, 2, 2, 4, 0, 4]
    # d is within 2 of c, but c joined a's group; d is 6 from a, so it starts its own group.
    assert near_duplicate_groups(hashes, max_distance=4) == [0, 0, 0, 3, 4, 0, 4]
    assert near_duplicate_groups(hashes, max_distance=64) == [0] * 7
    assert near_duplicate_groups([], max_distance=3) == []
    with pytest.raises(ValueError):
        near_duplicate_groups([1, -1], max_distance=1)
    with pytest.raises(ValueError):
        near_duplicate_groups([1], max_distance=-1)


def brute_force_groups(hashes: list[int], max_distance: int) -> list[int]:
    """The definition, O(n^2): earliest group-starting item within max_distance, else self."""
    out: list[int] = []
    for i, h in enumerate(hashes):
        group = next((j for j in range(i) if out[j] == j and bin(h ^ hashes[j]).count("1") <= max_distance), i)
        out.append(group)
    return out


def planted_hashes(n: int, bits: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    hashes = [rng.getrandbits(bits) for _ in range(n)]
    for i in range(n):
        if rng.random() < 0.35:  # a near copy of an earlier (or later) item, 0..12 bits flipped
            h = hashes[rng.randrange(n)]
            for _ in range(rng.randrange(13)):
                h ^= 1 << rng.randrange(bits)
            hashes[i] = h
    return hashes


@pytest.mark.parametrize("max_distance", [0, 3, 6, 10, 20])
def test_near_duplicate_groups_matches_brute_force(max_distance: int) -> None:
    hashes = planted_hashes(2000, 64, seed=max_distance)
    expected = brute_force_groups(hashes, max_distance)
    assert len(set(expected)) < 2000  # the planted copies do group
    assert near_duplicate_groups(hashes, max_distance=max_distance) == expected
    # Each search method alone gives the same answer (auto mixes them by cost).
    for method in ("index", "scan"):
        assert images_mod._greedy_groups(hashes, max_distance, method=method) == expected


def test_near_duplicate_groups_wide_hashes_match_brute_force() -> None:
    hashes = planted_hashes(400, 256, seed=7)  # hash_size=16 pHashes; Python scan path
    for max_distance in (0, 5, 12):
        expected = brute_force_groups(hashes, max_distance)
        for method in ("auto", "index", "scan"):
            assert images_mod._greedy_groups(hashes, max_distance, method=method) == expected


def test_popcount_fallback_matches_numpy() -> None:
    x = np.random.default_rng(0).integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    expected = np.array([bin(int(v)).count("1") for v in x])
    np.testing.assert_array_equal(images_mod._popcount_u64_table(x), expected)
    np.testing.assert_array_equal(images_mod._popcount_u64(x), expected)

"""Decode, validate and repair one image file; hash decoded pixels for duplicate detection.

The clean stage calls :func:`decode_image` on every file of a user's folder, which is never
clean: files that are empty, cut short, not images at all, images of formats we refuse to parse
(EPS, PSD, PDF ...), decompression bombs, animations, palette/alpha/CMYK/16-bit pictures and
photos whose EXIF says "rotate me". Every file ends in exactly one of two outcomes:

* a :class:`DecodedImage` of uint8 pixels in the requested channel layout, with ``repairs``
  listing (as stable codes from :data:`REPAIR_CODES`) everything that was changed to get there;
* an :class:`ImageRejected` carrying a stable ``reason`` from :data:`REJECT_REASONS` and a
  human ``detail``.

Nothing else escapes for bad *input* (``MemoryError`` and ``KeyboardInterrupt`` do, on purpose:
those are about the machine, not the file). Bad *arguments* (an unknown ``channels`` value) are
programmer errors and raise ``ValueError``/``TypeError``.

Why it is built this way:

* **The format is identified from the content, against an allow-list.** ``Image.open`` is given
  ``formats=`` so only the PNG, JPEG, GIF, BMP, TIFF, WebP and PPM plugins may even look at the
  bytes. An EPS file renamed ``.png`` is then never handed to the EPS plugin, whose ``load()``
  runs Ghostscript (an external interpreter of a Turing-complete language, with a long CVE
  history). Identifying by extension, or opening first and checking ``im.format`` after, would
  both be too late or too trusting.
* **A full decode with ``load()``, never ``verify()``.** ``verify()`` only checks chunk CRCs for
  PNG and does nothing useful for most other formats; it does not run the decompressor, so a file
  whose compressed data is corrupt or cut short passes it. ``load()`` proves that every pixel
  decodes, which is what training will do later.
* **Truncation is an error.** If anything set ``ImageFile.LOAD_TRUNCATED_IMAGES = True``, Pillow
  silently pads a cut-short image with grey/black and returns it; a dataset would quietly gain
  half-grey pictures. We force the flag to False while we decode (see "Processes" below) and also
  compare a WebP's RIFF size with the file's length, because libwebp reports a short WebP only
  as "could not create decoder object".
* **Decompression bombs are refused from the header, before a pixel is decoded.** Pillow's
  ``DecompressionBombWarning`` is turned into an error inside a ``warnings.catch_warnings()``
  block, ``DecompressionBombError`` is caught, and width*height is compared with ``max_pixels``
  (and with ``Image.MAX_IMAGE_PIXELS``, so the outcome does not depend on whoever else edits the
  warning filters). The effective limit is therefore ``min(max_pixels, Image.MAX_IMAGE_PIXELS)``.
* **Repairs are explicit and recorded.** EXIF orientation is applied; palettes expanded; alpha
  composited on a stated background with exact integer rounding; CMYK and other colour spaces
  converted; 16-bit data *scaled* to 8 bits (never clipped at 255); the result converted to the
  caller's channel policy. Each step appends its code to ``repairs`` only when it changed
  something, so a report can count what the dataset needed.
* **Warnings are captured, not printed or raised.** Pillow warns about, e.g., corrupt EXIF. Inside
  the decode every warning is recorded and returned in ``DecodedImage.warnings`` so the outcome
  does not depend on the caller's warning filters (``-W error`` would otherwise turn a harmless
  EXIF warning into a rejection on one machine and not another).

Arrays: sources that ship pixel arrays (IDX, npz, the embedded default) never become files, but
their items go through :func:`normalise_array`, which runs the very same mode normalisation as a
decoded file (:func:`_normalise`: the same integer alpha compositing, the same luma, the same repair
codes), so a picture gives the same pixels whether it arrived as a PNG or as a row of an array.
:func:`scale_uint16` and :func:`scale_unit_float` are the one place where deeper samples become
8-bit, for files and arrays alike.

Processes: :func:`decode_image` is a pure function meant for worker processes. It changes no
Pillow global for good. Two things are process-global for the duration of one call only and are
restored on exit: the ``warnings`` filter list (``catch_warnings``) and, *only if a caller had
set it True*, ``ImageFile.LOAD_TRUNCATED_IMAGES``. Neither is thread-safe in Python 3.11, so run
decodes in processes, not threads (the clean stage does).

Hashes: :func:`pixel_hash` finds exact duplicates on decoded pixels (the same picture saved as
PNG and BMP matches); :func:`perceptual_hash` plus :func:`near_duplicate_groups` find near
duplicates (re-encoded, lightly resized) in ~n time using multi-index hashing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import numbers
import os
import stat
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "REJECT_REASONS",
    "REPAIR_CODES",
    "DecodedImage",
    "ImageRejected",
    "decode_image",
    "hamming",
    "normalise_array",
    "near_duplicate_groups",
    "perceptual_hash",
    "perceptual_hashes",
    "phash_from_thumbnails",
    "phash_thumbnail",
    "phash_thumbnails",
    "pixel_hash",
    "pixel_hashes",
    "scale_uint16",
    "scale_unit_float",
]

# Pillow format names that may be decoded. The order of _OPEN_ORDER is the order in which
# Image.open tries the plugins (most common first); every plugin checks a magic number before
# parsing, so the order never changes which plugin opens a file.
_OPEN_ORDER: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
ALLOWED_FORMATS: frozenset[str] = frozenset(_OPEN_ORDER)

# The JPEG plugin turns a multi-picture JPEG (phone cameras' stereo/depth pictures) into an
# "MPO" image; it is a JPEG container opened by the allowed JPEG plugin, so its frames go
# through the same `animated` policy as a GIF's. "MPO" cannot be passed to Image.open(formats=).
_FORMATS_FROM_ALLOWED_PLUGINS: frozenset[str] = ALLOWED_FORMATS | {"MPO"}

REJECT_REASONS: dict[str, str] = {
    "empty": "the file has zero bytes",
    "not_a_file": "the path is not a regular file (a directory, device, pipe or socket)",
    "unreadable": "the file could not be read or its image data could not be decoded",
    "not_an_image": "the content is not an image format Pillow recognises",
    "format_not_allowed": "the content is an image format outside the allow-list (e.g. EPS, PSD, PDF)",
    "decompression_bomb": "the header declares more pixels than the limit (max_pixels or Pillow's bomb limit)",
    "truncated": "the file ends before the image data does",
    "too_small": "the width or height is below min_size",
    "animated": "the file holds more than one frame (animation, multi-page TIFF, MPO) and animated='reject'",
    "unsupported_mode": "the pixel mode cannot be converted to grayscale or RGB",
}

REPAIR_CODES: dict[str, str] = {
    "first_frame_of_animation": "the file holds several frames; only frame 0 was kept",
    "exif_orientation": "rotated/flipped as the EXIF Orientation tag says (tag value 2..8)",
    "palette_expanded": "palette (P/PA) pixels expanded to RGB or RGBA",
    "1bit_expanded": "1-bit pixels expanded to 8-bit grayscale (0 -> 0, 1 -> 255)",
    "16bit_scaled": "more than 8 bits per sample scaled to 8 bits: v >> (bits - 8)",
    "float_scaled": "floating-point samples mapped from [0, 1] to 0..255 (outside clipped, NaN -> 0)",
    "cmyk_converted": "CMYK converted to RGB",
    "colorspace_converted": "YCbCr, LAB or HSV converted to RGB",
    "alpha_composited": "semi-transparent pixels composited on the background colour",
    "rgb_to_gray": "colour converted to grayscale with the ITU-R 601-2 luma transform",
    "gray_to_rgb": "grayscale replicated into three RGB channels",
}


class ImageRejected(Exception):
    """A file was refused; ``reason`` is a code from :data:`REJECT_REASONS`.

    Not a :class:`~pipeline.errors.UserError`: a rejected file is an expected outcome that the
    clean stage records and counts, not a failure of the run.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; known: {', '.join(REJECT_REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[ImageRejected], tuple[str, str]]:
        # Exception's default pickling calls cls(*self.args) = cls(message), which does not match
        # __init__; workers send rejections back to the parent process, so they must pickle.
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class DecodedImage:
    pixels: np.ndarray  # uint8 [H, W, C], C = 1 (channels="gray") or 3 ("rgb"), C-contiguous
    source_format: str  # Pillow format name as identified from the content, e.g. "PNG", "MPO"
    source_mode: str  # Pillow mode of frame 0 as stored, e.g. "P", "RGBA", "I;16", "CMYK"
    source_size: tuple[int, int]  # (width, height) as stored, before EXIF rotation
    repairs: tuple[str, ...]  # codes from REPAIR_CODES, in the order they were applied
    warnings: tuple[str, ...] = ()  # Pillow warnings raised while decoding, "Category: message"


# ----------------------------------------------------------------------------------------------
# decode_image
# ----------------------------------------------------------------------------------------------

_Channels = Literal["gray", "rgb"]
_Animated = Literal["reject", "first_frame"]

_PREFIX_LEN = 16  # what Image.open reads to pick a plugin
_INT_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"LA", "RGBA"})


def decode_image(
    source: str | os.PathLike[str] | bytes,
    *,
    channels: _Channels,
    background: tuple[int, int, int] = (255, 255, 255),
    min_size: int = 8,
    max_pixels: int = 64_000_000,
    animated: _Animated = "first_frame",
) -> DecodedImage:
    """Fully decode one image and normalise it to uint8 gray or RGB, or raise ImageRejected.

    Args:
        source: a path to a file, or the file's bytes (bytes, bytearray or memoryview).
        channels: "gray" -> pixels [H, W, 1] by the ITU-R 601-2 luma (Pillow's convert("L"));
            "rgb" -> pixels [H, W, 3].
        background: RGB colour (0..255 each) that transparent pixels are composited on.
        min_size: smallest allowed width and height, in pixels.
        max_pixels: largest allowed width*height as declared in the header. Pillow's own bomb
            limit (``Image.MAX_IMAGE_PIXELS``, 89.5 M by default) also applies, so the effective
            limit is the smaller of the two.
        animated: for files with more than one frame, "reject" or "first_frame" (keep frame 0).

    Steps, in order: identify the format from the first bytes (allow-list); check the declared
    size against the bomb limits and ``min_size``; count frames and apply ``animated``; ``load()``
    frame 0; apply EXIF orientation; normalise the mode:

    * "1" -> L (0/255); "P"/"PA" -> RGB, or RGBA when the palette has transparency;
    * "CMYK" -> RGB; "YCbCr"/"LAB"/"HSV" -> RGB; "RGBX" -> RGB; "La"/"RGBa" -> LA/RGBA;
    * integer samples of more than 8 bits are **scaled, not clipped**: ``v8 = v >> (bits - 8)``
      where ``bits`` is the depth the file declares (16 for 16-bit PNG and PPM, BitsPerSample
      for TIFF, e.g. 12). For 16-bit data: 0 -> 0, 255 -> 0, 256 -> 1, 32768 -> 128,
      65535 -> 255. Values beyond the declared depth (corrupt files) saturate at 255, negative
      ones (signed TIFF) at 0. 16-bit RGB/RGBA PNGs are reduced by Pillow itself while reading,
      with the same high-byte mapping; they are recorded as "16bit_scaled" too;
    * floating-point samples ("F": TIFF float, PFM) are taken as nominal [0, 1]:
      ``v8 = round(clip(v, 0, 1) * 255)`` (ties to even, so 0.5 -> 128), NaN -> 0;
    * alpha (LA, RGBA): if every pixel is fully opaque the alpha channel is dropped and nothing
      is recorded; otherwise every pixel becomes ``round((c*a + bg*(255 - a)) / 255)`` per
      channel ("alpha_composited"). For a gray image kept gray, ``bg`` is the luma of
      ``background``;
    * finally the channel policy: RGB -> L records "rgb_to_gray", L -> RGB records
      "gray_to_rgb".

    Raises:
        ImageRejected: for every problem with the file (see REJECT_REASONS).
        ValueError, TypeError: for bad arguments (programmer errors).
    """
    _check_arguments(source, channels, background, min_size, max_pixels, animated)
    with _open_source(source) as (fp, length):
        if length == 0:
            raise ImageRejected("empty", "the file has zero bytes")
        prefix = fp.read(_PREFIX_LEN)
        _check_riff_length(prefix, length)
        with _decode_context() as recorded:
            im = _open_allowed(fp, prefix)
            source_format, source_size = str(im.original.format), im.original.size
            try:
                repairs, source_mode = _load_frame0(im, min_size=min_size, max_pixels=max_pixels, animated=animated)
                _exif_transpose_in_place(im, repairs)
                bg = (int(background[0]), int(background[1]), int(background[2]))
                pixels = _normalise(im.image, channels, bg, repairs)
            finally:
                im.close()
        warn_texts = _format_warnings(recorded)
    return DecodedImage(
        pixels=pixels,
        source_format=source_format,
        source_mode=source_mode,
        source_size=source_size,
        repairs=tuple(repairs),
        warnings=warn_texts,
    )


def _check_arguments(
    source: object, channels: str, background: tuple[int, int, int], min_size: int, max_pixels: int, animated: str
) -> None:
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
    if channels not in ("gray", "rgb"):
        raise ValueError(f"channels must be 'gray' or 'rgb', not {channels!r}")
    if animated not in ("reject", "first_frame"):
        raise ValueError(f"animated must be 'reject' or 'first_frame', not {animated!r}")
    if (
        not isinstance(background, (tuple, list))
        or len(background) != 3
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= 255 for v in background)
    ):
        raise ValueError(f"background must be three ints in 0..255, not {background!r}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, not {min_size}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, not {max_pixels}")


@contextlib.contextmanager
def _open_source(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> Iterator[tuple[BinaryIO, int]]:
    """Yield a binary file object positioned at 0 and its length in bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        yield io.BytesIO(data), len(data)
        return
    # O_NONBLOCK: opening a FIFO that someone dropped into the folder must not hang the worker;
    # it has no effect on regular files. fstat on the open descriptor (not stat on the path)
    # so the type we check is the type of what we read.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(source, flags)
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot open the file: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ImageRejected("unreadable", f"cannot stat the file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageRejected("not_a_file", "not a regular file (directory, device, pipe or socket)")
    with os.fdopen(fd, "rb") as fp:
        yield fp, st.st_size


def _check_riff_length(prefix: bytes, length: int) -> None:
    """Reject a WebP whose RIFF header declares more bytes than the file has.

    libwebp reports a cut-short WebP only as "could not create decoder object"; the RIFF size
    field is the one place that says explicitly that bytes are missing.
    """
    if len(prefix) >= 12 and prefix.startswith(b"RIFF") and prefix[8:12] == b"WEBP":
        declared = struct.unpack("<I", prefix[4:8])[0] + 8
        if declared > length:
            raise ImageRejected("truncated", f"the WebP header declares {declared} bytes, the file has {length}")


@contextlib.contextmanager
def _decode_context() -> Iterator[list[warnings.WarningMessage]]:
    """Strict, deterministic Pillow settings for one decode; translate Pillow's exceptions.

    Yields the list that collects warnings. Every exception other than ImageRejected,
    MemoryError and BaseExceptions that are not Exceptions (KeyboardInterrupt, SystemExit)
    becomes an ImageRejected: Pillow's plugins raise a zoo of types on hostile input (OSError,
    ValueError, SyntaxError, struct.error, EOFError, IndexError, ZeroDivisionError, ...) and
    none of them may abort the clean stage.
    """
    with warnings.catch_warnings(record=True) as recorded, _strict_truncation():
        # "always" so a repeated warning is still recorded for this file; the bomb warning is
        # inserted in front, so it wins, and becomes an exception.
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield recorded
        except ImageRejected:
            raise
        except MemoryError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("decompression_bomb", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - see docstring: hostile input raises anything
            raise _rejection_for(exc) from None


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make sure ImageFile.LOAD_TRUNCATED_IMAGES is False for the decode.

    Pillow reads this module global at decode time. In the normal case it is already False and
    nothing is touched. If a caller (or a library it imported) set it True, we cannot ask the
    decoders to be strict any other way, so it is set False for this call and restored after.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    if previous is False:
        yield
        return
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _rejection_for(exc: BaseException) -> ImageRejected:
    text = f"{type(exc).__name__}: {exc}"
    # Pillow's ImageFile.load raises OSError("image file is truncated ...") when the data runs
    # out, and some plugins raise EOFError or "Truncated File Read" while parsing.
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return ImageRejected("truncated", text)
    return ImageRejected("unreadable", text)


@dataclass
class _Opened:
    """The Pillow image being worked on, and the one Image.open returned (for format/size)."""

    original: ImageFile.ImageFile
    image: Image.Image

    def close(self) -> None:
        if self.image is not self.original:
            self.image.close()
        self.original.close()


def _available_allowed_formats() -> tuple[str, ...]:
    # Image.init() imports and registers every plugin (idempotent; Image.open does it too).
    # A Pillow built without e.g. libwebp has no "WEBP" entry; passing it to Image.open would
    # raise KeyError instead of "cannot identify".
    Image.init()
    return tuple(f for f in _OPEN_ORDER if f in Image.OPEN)


def _open_allowed(fp: BinaryIO, prefix: bytes) -> _Opened:
    """Image.open restricted to the allow-list; classify what it refuses."""
    fp.seek(0)
    try:
        im = Image.open(fp, formats=_available_allowed_formats())
    except UnidentifiedImageError:
        other = _recognised_format(prefix)
        if other is None:
            raise ImageRejected("not_an_image", "the content matches no image format Pillow knows") from None
        if other in ALLOWED_FORMATS:
            # The signature is right but the allowed plugin could not parse the header.
            raise ImageRejected("unreadable", f"looks like {other} but its header could not be parsed") from None
        allowed = ", ".join(_OPEN_ORDER)
        raise ImageRejected("format_not_allowed", f"{other} is not in the allow-list ({allowed})") from None
    if im.format not in _FORMATS_FROM_ALLOWED_PLUGINS:  # cannot happen with formats=; be explicit
        im.close()
        raise ImageRejected("format_not_allowed", f"{im.format} is not in the allow-list")
    return _Opened(original=im, image=im)


def _recognised_format(prefix: bytes) -> str | None:
    """The Pillow format whose signature check accepts ``prefix``, without opening anything.

    Only the plugins' ``_accept`` functions run: pure byte comparisons on the first 16 bytes.
    No plugin's parser (let alone Ghostscript) sees the file.
    """
    Image.init()
    # Allowed formats first: a broken PNG must read as "looks like PNG", even if some other
    # plugin's looser signature check would also accept its first bytes.
    for fmt in sorted(Image.ID, key=lambda f: f not in ALLOWED_FORMATS):
        accept = Image.OPEN[fmt][1]
        if accept is None:
            # Plugins with no signature check (TGA, SPIDER, ...) would claim any bytes at all.
            continue
        try:
            result = accept(prefix)
        except (IndexError, struct.error, TypeError, ValueError):
            # A signature check that cannot even index these bytes means "not this format".
            continue
        # A str result is Pillow's way of saying "this is format X, but unsupported".
        if result:
            return fmt
    return None


def _load_frame0(im: _Opened, *, min_size: int, max_pixels: int, animated: str) -> tuple[list[str], str]:
    """Check size and frames from the header, then load() frame 0. Returns (repairs, mode)."""
    width, height = im.original.size
    pixels = width * height
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pixels > max_pixels or (pillow_limit is not None and pixels > pillow_limit):
        limit = max_pixels if pillow_limit is None else min(max_pixels, pillow_limit)
        raise ImageRejected("decompression_bomb", f"{width}x{height} = {pixels} pixels exceeds the limit of {limit}")
    if width < min_size or height < min_size:
        raise ImageRejected("too_small", f"{width}x{height} is smaller than min_size={min_size} on a side")
    repairs: list[str] = []
    # n_frames walks the frame headers (GIF, TIFF IFDs) without decoding pixels.
    n_frames = getattr(im.original, "n_frames", 1)
    if n_frames > 1:
        if animated == "reject":
            raise ImageRejected("animated", f"{n_frames} frames ({im.original.format})")
        repairs.append("first_frame_of_animation")
        if im.original.tell() != 0:
            im.original.seek(0)
    # Source mode is that of frame 0 as stored (for GIF, later frames load as RGB/RGBA).
    source_mode = im.original.mode
    repairs.extend(_high_bit_depth_rgb(im.original))
    im.original.load()
    return repairs, source_mode


def _high_bit_depth_rgb(im: Image.Image) -> list[str]:
    """'16bit_scaled' when Pillow will reduce 16-bit colour samples to 8 bits while reading.

    A 16-bit RGB/RGBA (or grey+alpha) PNG opens as mode RGB/RGBA with a raw mode such as
    "RGB;16B": Pillow keeps the high byte, i.e. the same ``v >> 8`` mapping as ours. Only the
    tile's raw mode, known before load(), tells this apart from an 8-bit file.
    """
    if im.mode in _INT_16BIT_MODES or im.mode in ("I", "F"):
        return []  # scaled by us in _normalise, recorded there
    for tile in im.tile:
        args = tile.args
        rawmode = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
        if isinstance(rawmode, str) and ";16" in rawmode:
            return ["16bit_scaled"]
    return []


def _exif_transpose_in_place(im: _Opened, repairs: list[str]) -> None:
    """Apply the EXIF Orientation tag (after load(): a PNG's eXIf chunk may follow the pixels)."""
    try:
        orientation = im.image.getexif().get(0x0112)
    except (SyntaxError, ValueError, TypeError, struct.error, OSError, KeyError, IndexError) as exc:
        # Unreadable EXIF must not cost us an otherwise good picture: keep it unrotated and say
        # so in the returned warnings.
        warnings.warn(
            f"EXIF could not be read, orientation not applied ({type(exc).__name__}: {exc})", UserWarning, stacklevel=2
        )
        return
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        transposed = ImageOps.exif_transpose(im.image)
        if transposed is not None and transposed is not im.image:
            if im.image is not im.original:
                im.image.close()
            im.image = transposed
        repairs.append("exif_orientation")


def _format_warnings(recorded: list[warnings.WarningMessage]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for w in recorded:
        seen.setdefault(f"{w.category.__name__}: {w.message}", None)
    return tuple(seen)


def _normalise(im: Image.Image, channels: str, background: tuple[int, int, int], repairs: list[str]) -> np.ndarray:
    """Any loaded mode -> uint8 [H, W, 1] or [H, W, 3], appending repair codes."""
    mode = im.mode
    if mode == "1":
        im = im.convert("L")
        repairs.append("1bit_expanded")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        repairs.append("palette_expanded")
    elif mode == "CMYK":
        im = im.convert("RGB")
        repairs.append("cmyk_converted")
    elif mode in ("YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
        repairs.append("colorspace_converted")
    elif mode in _INT_16BIT_MODES or mode == "I":
        im = Image.fromarray(_scale_integer_samples(im), mode="L")
        repairs.append("16bit_scaled")
    elif mode == "F":
        im = Image.fromarray(_scale_float_samples(np.array(im, dtype=np.float32)), mode="L")
        repairs.append("float_scaled")
    elif mode == "RGBX":
        im = im.convert("RGB")
    elif mode == "La":
        im = im.convert("LA")  # premultiplied -> straight alpha, then composited below
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageRejected("unsupported_mode", f"pixel mode {mode!r} cannot be converted to gray or RGB")

    if im.mode in _ALPHA_MODES:
        arr = np.array(im, dtype=np.uint8)  # [H, W, 2] or [H, W, 4]
        color, alpha = arr[..., :-1], arr[..., -1:]
        if channels == "rgb" and color.shape[-1] == 1:
            color = np.repeat(color, 3, axis=-1)
            repairs.append("gray_to_rgb")
        if alpha.min() < 255:
            bg = background if color.shape[-1] == 3 else (_luma(background),)
            color = _composite(color, alpha, bg)
            repairs.append("alpha_composited")
        im = Image.fromarray(np.ascontiguousarray(color if color.shape[-1] == 3 else color[..., 0]))

    if channels == "gray" and im.mode == "RGB":
        im = im.convert("L")  # ITU-R 601-2 luma: L = R*299/1000 + G*587/1000 + B*114/1000
        repairs.append("rgb_to_gray")
    elif channels == "rgb" and im.mode == "L":
        im = im.convert("RGB")
        repairs.append("gray_to_rgb")

    out = np.array(im, dtype=np.uint8)
    if out.ndim == 2:
        out = out[..., None]
    return np.ascontiguousarray(out)


def _declared_bits(im: Image.Image) -> int:
    """Bits per sample the file declares for an I;16*/I image (see decode_image's docstring)."""
    default = 16 if (im.mode in _INT_16BIT_MODES or im.format in ("PNG", "PPM")) else 32
    if im.format == "TIFF":
        tag = getattr(im, "tag_v2", {}).get(258)  # BitsPerSample, an int or one per sample
        bits = max(tag) if isinstance(tag, tuple) and tag else tag
        if isinstance(bits, int) and 8 < bits <= default:
            return bits
    return default


def _scale_integer_samples(im: Image.Image) -> np.ndarray:
    """I;16*/I samples -> uint8 by v >> (bits - 8). [H, W] -> [H, W]."""
    # I;16B arrives as >u2, I as int32; scale_bits widens to int64, which holds both.
    return scale_bits(np.array(im), _declared_bits(im))


def scale_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Integer samples of ``bits`` bits (9..32) -> uint8 by ``v >> (bits - 8)``; any shape.

    Scaling, not clipping: the top of the range maps to 255 (65535 -> 255 for 16 bits). Values
    outside 0..2**bits - 1 (corrupt or signed data) saturate at 0 and 255.
    """
    if not 8 < bits <= 32:
        raise ValueError(f"bits must be in 9..32, not {bits}")
    wide = np.clip(np.asarray(values).astype(np.int64), 0, (1 << bits) - 1)
    return (wide >> (bits - 8)).astype(np.uint8)


def scale_uint16(values: np.ndarray) -> np.ndarray:
    """uint16 samples (16-bit PNG/TIFF/PPM, or a uint16 array) -> uint8 by ``v >> 8``; any shape."""
    return scale_bits(values, 16)


def scale_unit_float(values: np.ndarray) -> np.ndarray:
    """Float samples, nominal [0, 1] -> uint8 ``round(v * 255)`` (ties to even); outside clipped; NaN -> 0."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


_scale_float_samples = scale_unit_float


def _luma(rgb: tuple[int, int, int]) -> int:
    # The same transform (and rounding) as the image's own RGB -> L conversion.
    return int(Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0)))


def _composite(color: np.ndarray, alpha: np.ndarray, background: tuple[int, ...]) -> np.ndarray:
    """round((c*a + bg*(255 - a)) / 255) per channel, exactly, in integers.

    color: uint8 [H, W, K]; alpha: uint8 [H, W, 1]; background: K values. Because 255 is odd,
    N/255 is never exactly x.5, so (N + 127) // 255 is round(N / 255) with no tie to break.
    """
    c = color.astype(np.uint32)
    a = alpha.astype(np.uint32)
    bg = np.asarray(background, dtype=np.uint32).reshape(1, 1, -1)
    return ((c * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


_ARRAY_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def normalise_array(
    pixels: np.ndarray,
    *,
    channels: _Channels,
    background: tuple[int, int, int] = (255, 255, 255),
    min_size: int = 8,
) -> DecodedImage:
    """One item of an array source -> a :class:`DecodedImage`, exactly as if it were a file.

    pixels: uint8 [H, W] or [H, W, C] with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA);
    deeper samples are scaled to uint8 by the source (:func:`scale_uint16`, :func:`scale_unit_float`)
    before they are stored. The same :func:`_normalise` as for decoded files applies the channel
    policy and composites alpha on ``background``, so the pixels and repair codes are those a
    PNG of the same picture would give. ``source_format`` is "array".

    Raises ImageRejected ("too_small", "unsupported_mode") for the item, ValueError/TypeError for
    bad arguments. No decompression-bomb check: the pixels are already in memory.
    """
    if channels not in ("gray", "rgb"):
        raise ValueError(f"channels must be 'gray' or 'rgb', not {channels!r}")
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise TypeError(f"array items must be uint8 (sources scale deeper samples first), got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected pixels [H, W] or [H, W, C], got shape {arr.shape}")
    h, w, c = arr.shape
    mode = _ARRAY_MODES.get(c)
    if mode is None:
        raise ImageRejected("unsupported_mode", f"{c} channels; an array item needs 1, 2, 3 or 4")
    if w < min_size or h < min_size:
        raise ImageRejected("too_small", f"{w}x{h} is smaller than min_size={min_size} on a side")
    repairs: list[str] = []
    if (c == 1 and channels == "gray") or (c == 3 and channels == "rgb"):
        out = np.ascontiguousarray(arr)  # already in the target layout: what _normalise returns too
    else:
        bg = (int(background[0]), int(background[1]), int(background[2]))
        im = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if c == 1 else arr), mode=mode)
        out = _normalise(im, channels, bg, repairs)
    return DecodedImage(pixels=out, source_format="array", source_mode=mode, source_size=(w, h),
                        repairs=tuple(repairs))


# ----------------------------------------------------------------------------------------------
# Hashes
# ----------------------------------------------------------------------------------------------


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 (hex) of an array's shape, dtype and bytes: exact duplicates of decoded pixels.

    Hashing the decoded pixels instead of the file means the same picture stored as PNG and as
    BMP (or re-saved with other metadata) has the same hash. Shape and dtype are included so a
    64x16 and a 32x32 image with equal bytes differ.
    """
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{'x'.join(str(int(s)) for s in arr.shape)}|".encode("ascii"))
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def perceptual_hash(pixels: np.ndarray, *, hash_size: int = 8) -> int:
    """pHash of a uint8 image [H, W], [H, W, 1] or [H, W, 3], as an int of hash_size**2 bits.

    Grayscale (ITU-R 601-2 luma) -> LANCZOS resize to (4*hash_size)^2 -> 2-D DCT-II
    (orthonormal) -> the top-left hash_size x hash_size block of coefficients, DC included ->
    bit = coefficient > median of that block. Bits are packed row-major, first coefficient as the
    most significant bit. Near-identical pictures (re-encoded, resized) differ in few bits.
    Computed by :func:`perceptual_hashes`, so one image and a batch give the same hash.
    """
    return perceptual_hashes([pixels], hash_size=hash_size)[0]


def _dct_rows(n: int, keep: int) -> np.ndarray:
    """The first ``keep`` rows of the orthonormal DCT-II matrix of size n: float64 [keep, n]."""
    k = np.arange(keep, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash_thumbnail(pixels: np.ndarray, *, hash_size: int = 8) -> np.ndarray:
    """The first step of the pHash: luma, LANCZOS-resized to float64 [4*hash_size, 4*hash_size].

    Workers keep this thumbnail (8 KB) instead of the decoded pixels, and hash a whole chunk of
    thumbnails at once with :func:`phash_from_thumbnails`.
    """
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2, not {hash_size}")
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        im = Image.fromarray(np.ascontiguousarray(arr), mode="L")
    elif arr.ndim == 3 and arr.shape[-1] == 3:
        im = Image.fromarray(np.ascontiguousarray(arr), mode="RGB").convert("L")
    else:
        raise ValueError(f"expected pixels [H, W], [H, W, 1] or [H, W, 3], got shape {arr.shape}")
    if min(arr.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {arr.shape}")
    side = hash_size * 4
    return np.asarray(im.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float64)


def phash_thumbnails(block: np.ndarray, *, hash_size: int = 8) -> np.ndarray:
    """:func:`phash_thumbnail` of every image of a same-size batch, uint8 [N, H, W(, 1 or 3)] -> float64 [N, s, s].

    Bit-identical to the per-image function and ~5x faster for small images: Pillow resizes in
    two separable passes, horizontal then vertical, with the same fixed-point kernel and 8-bit
    rounding in each. Stacking the N images into one tall image makes the horizontal pass one
    call (rows never mix); the vertical pass is then a horizontal pass over the stacked
    transposes. tests/test_clean.py checks the equality on many sizes.
    """
    side = hash_size * 4
    arr = np.asarray(block)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4 and arr.shape[-1] == 3:
        n, h, w, _ = arr.shape
        luma = Image.fromarray(np.ascontiguousarray(arr.reshape(n * h, w, 3)), mode="RGB").convert("L")  # pointwise
        arr = np.asarray(luma).reshape(n, h, w)
    if arr.ndim != 3:
        raise ValueError(f"expected pixels [N, H, W], [N, H, W, 1] or [N, H, W, 3], got shape {block.shape}")
    n, h, w = arr.shape
    if n == 0:
        return np.zeros((0, side, side), np.float64)
    if min(h, w) < 1:
        raise ValueError(f"empty images of shape {arr.shape[1:]}")
    lanczos = Image.Resampling.LANCZOS
    rows = Image.fromarray(np.ascontiguousarray(arr.reshape(n * h, w)), mode="L").resize((side, n * h), lanczos)
    cols = np.asarray(rows).reshape(n, h, side).transpose(0, 2, 1)  # [N, s, H]: columns as rows
    out = Image.fromarray(np.ascontiguousarray(cols.reshape(n * side, h)), mode="L").resize((side, n * side), lanczos)
    return np.asarray(out).reshape(n, side, side).transpose(0, 2, 1).astype(np.float64)


def pixel_hashes(block: np.ndarray) -> list[str]:
    """:func:`pixel_hash` of every image of a same-size batch [N, ...]: identical values, less overhead."""
    arr = np.ascontiguousarray(block)
    header = f"{arr.dtype.str}|{'x'.join(str(int(s)) for s in arr.shape[1:])}|".encode("ascii")
    return [hashlib.sha256(header + item.tobytes()).hexdigest() for item in arr]


def phash_from_thumbnails(thumbs: np.ndarray, *, hash_size: int = 8) -> list[int]:
    """pHashes of float64 thumbnails [N, 4*hash_size, 4*hash_size] (see :func:`phash_thumbnail`).

    The DCT of all thumbnails is one pair of matrix products, ``D @ X @ D.T`` with only the
    hash_size rows of D that are kept ([N, s, s] -> [N, k, k]): hashing 70,000 MNIST-sized items
    takes about a second instead of a minute of per-image FFT calls.
    """
    side = hash_size * 4
    thumbs = np.asarray(thumbs, dtype=np.float64)
    if thumbs.ndim != 3 or thumbs.shape[1:] != (side, side):
        raise ValueError(f"expected thumbnails [N, {side}, {side}], got shape {thumbs.shape}")
    if not len(thumbs):
        return []
    d = _dct_rows(side, hash_size)  # [k, s]
    coeffs = (d @ thumbs @ d.T).reshape(len(thumbs), -1)  # [N, k*k], row-major, DC first
    ordered = np.sort(coeffs, axis=1)
    half = coeffs.shape[1] // 2
    if coeffs.shape[1] % 2:
        median = ordered[:, half]
    else:
        median = (ordered[:, half - 1] + ordered[:, half]) / 2.0
    bits = coeffs > median[:, None]  # [N, k*k]
    # packbits pads the last byte with zeros on the right; shift them out again.
    pad = (-bits.shape[1]) % 8
    packed = np.packbits(bits, axis=1)
    return [int.from_bytes(row.tobytes(), "big") >> pad for row in packed]


def perceptual_hashes(images: Sequence[np.ndarray] | np.ndarray, *, hash_size: int = 8) -> list[int]:
    """:func:`perceptual_hash` of each image of a batch (a list of images, or uint8 [N, H, W(, C)])."""
    side = hash_size * 4
    thumbs = np.empty((len(images), side, side), dtype=np.float64)
    for n, pixels in enumerate(images):
        thumbs[n] = phash_thumbnail(pixels, hash_size=hash_size)
    return phash_from_thumbnails(thumbs, hash_size=hash_size)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two non-negative hashes."""
    a, b = int(a), int(b)
    if a < 0 or b < 0:
        raise ValueError("hashes must be non-negative integers")
    return (a ^ b).bit_count()


def near_duplicate_groups(hashes: Sequence[int], *, max_distance: int) -> list[int]:
    """Group near-duplicate hashes; return, for each item, the index of its group's first item.

    Semantics (greedy, in order): item 0 starts a group. Each later item joins the group of the
    **earliest group-starting item** within ``max_distance`` (Hamming) of it, or starts its own
    group (its value is its own index) when there is none. So ``out[i] <= i``,
    ``out[out[i]] == out[i]``, every item is within ``max_distance`` of its group's first item,
    and the items with ``out[i] == i`` (the ones a dedup step keeps) are pairwise more than
    ``max_distance`` apart. Comparing only with group-starting items, not with every earlier
    item, stops a chain a~b~c of small steps from dropping c although it is far from the kept a.

    Two exact search methods give the same answer; each item uses the one its cost model says is
    cheaper at that point (ns estimates measured on CPython 3.11 / numpy 2):

    * **Multi-index hashing** (small ``max_distance``): split the ``bits``-bit hashes into ``m``
      disjoint bands. If two hashes differ in at most ``d`` bits, some band differs in at most
      ``r = d // m`` bits (pigeonhole; ``m = d + 1`` gives the classic "some band is
      identical"). Every group start is stored in one dict per band keyed by its band value; an
      item probes, per band, every key within ``r`` bits of its own band value and checks only
      the group starts found there with the full Hamming distance. ``m`` and ``r`` minimise
      ``P + n * P / 2**width`` where ``P = sum over bands of sum_{k<=r} comb(width, k)``.
    * **Scan of the group starts** (large ``max_distance``, or few groups so far): XOR and
      popcount against all G group starts at once with numpy (hashes of at most 64 bits), or in
      Python for wider hashes; the first hit in index order is the answer.

    Complexity: per item min(O(P + C), O(G)) where C is the number of group starts sharing a
    probed band value (about ``G * P / 2**width`` for well-spread hashes); identical hashes are
    answered from a memo in O(1). Worst case O(n * G) <= O(n**2 / 2) at ~1 ns per pair
    (numpy). Measured (one CPU core) for the 64-bit pHashes of the 70,000 Fashion-MNIST images:
    0.5 s at d=2, at most 2.4 s for any d up to 32; for 100,000 random 64-bit hashes (the hard
    case: almost every item starts a group) 1.6 s at d=4 and 5-8 s for d from 6 to 10.
    Memory O(n * m).
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, not {max_distance}")
    values = [int(h) for h in hashes]
    if any(v < 0 for v in values):
        raise ValueError("hashes must be non-negative integers")
    return _greedy_groups(values, max_distance, method="auto")


# Cost model of near_duplicate_groups, in ns (CPython 3.11, numpy 2). Only the speed depends on
# these numbers; both methods are exact.
_NS_PROBE = 90.0  # one dict probe of the band index
_NS_CANDIDATE = 100.0  # one Hamming check of a candidate found in the index
_NS_SCAN_NUMPY = (3500.0, 1.2)  # numpy scan: fixed overhead + per group start
_NS_SCAN_PYTHON = (0.0, 90.0)  # Python scan (hashes wider than 64 bits)


def _greedy_groups(values: list[int], max_distance: int, *, method: Literal["auto", "index", "scan"]) -> list[int]:
    """near_duplicate_groups on validated ints; ``method`` forces one search (for tests)."""
    n = len(values)
    if n == 0:
        return []
    nbits = max(1, max(v.bit_length() for v in values))
    if max_distance >= nbits:
        return [0] * n  # every pair differs in at most nbits <= max_distance bits

    widths, radius = _plan_bands(nbits, max_distance, n)
    flips = [_flip_masks(w, radius) for w in widths]
    n_probes = sum(len(f) for f in flips)
    item_keys = _band_keys(values, nbits, len(widths))
    tables: list[dict[int, list[int]]] = [{} for _ in widths]

    use_numpy = nbits <= 64
    starts: list[int] = []  # group starts, ascending
    start_hashes = np.zeros(n if use_numpy else 0, dtype=np.uint64)  # their hashes, same order
    scan_fixed, scan_per = _NS_SCAN_NUMPY if use_numpy else _NS_SCAN_PYTHON
    # Fraction of the group starts that one index search examines; starts at the estimate for
    # well-spread hashes and follows what is actually seen (clustered hashes collide more).
    seen_candidates, seen_starts = 0.0, 0.0
    prior = sum(len(f) / 2.0**w for f, w in zip(flips, widths))

    memo: dict[int, int] = {}  # hash value -> group of the first item with that exact value
    out: list[int] = []
    for i, (h, keys) in enumerate(zip(values, item_keys)):
        known = memo.get(h)
        if known is not None:
            # The earliest group start within d of h was already found for an identical hash;
            # starts added since then have larger indices, so the answer is unchanged.
            out.append(known)
            continue
        g = len(starts)
        if method == "auto":
            fraction = (seen_candidates + prior * 64) / (seen_starts + 64)  # smoothed estimate
            index_cost = _NS_PROBE * n_probes + _NS_CANDIDATE * fraction * g
            use_index = index_cost < scan_fixed + scan_per * g
        else:
            use_index = method == "index"

        best = i
        if use_index:
            examined = 0
            for table, key, band_flips in zip(tables, keys, flips):
                for flip in band_flips:
                    bucket = table.get(key ^ flip)
                    if bucket is None:
                        continue
                    examined += len(bucket)
                    for j in bucket:  # ascending: buckets are appended in index order
                        if j >= best:
                            break
                        if (h ^ values[j]).bit_count() <= max_distance:
                            best = j
                            break
            seen_candidates += examined
            seen_starts += g
        elif g:
            if use_numpy:
                near = _popcount_u64(start_hashes[:g] ^ np.uint64(h)) <= max_distance
                k = int(near.argmax())  # first True = earliest group start
                if near[k]:
                    best = starts[k]
            else:
                for j in starts:
                    if (h ^ values[j]).bit_count() <= max_distance:
                        best = j
                        break

        out.append(best)
        memo[h] = best
        if best == i:
            if use_numpy:
                start_hashes[g] = h
            starts.append(i)
            for table, key in zip(tables, keys):
                table.setdefault(key, []).append(i)
    return out


def _popcount_u64(x: np.ndarray) -> np.ndarray:
    """Set bits per element of a uint64 array (np.bitwise_count needs numpy >= 2.0)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _popcount_u64_table(x)


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_u64_table(x: np.ndarray) -> np.ndarray:
    as_bytes = np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(-1, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=1, dtype=np.uint8)


def _plan_bands(nbits: int, max_distance: int, n: int) -> tuple[list[int], int]:
    """Choose (band widths, radius) minimising probes + expected candidates per item."""
    best: tuple[float, list[int], int] | None = None
    for m in range(1, min(max_distance + 1, nbits) + 1):
        radius = max_distance // m
        base, extra = divmod(nbits, m)
        widths = [base + (1 if b < extra else 0) for b in range(m)]
        probes = [sum(math.comb(w, k) for k in range(min(radius, w) + 1)) for w in widths]
        cost = sum(p + n * p / 2.0**w for p, w in zip(probes, widths))
        if best is None or cost < best[0]:
            best = (cost, widths, radius)
    assert best is not None  # the loop runs at least once: max_distance >= 0, nbits >= 1
    return best[1], best[2]


def _band_keys(values: list[int], nbits: int, m: int) -> list[tuple[int, ...]]:
    """Per item, the m band values; band b holds bits b, b+m, b+2m, ... (MSB first).

    Strided rather than contiguous bands: pHash bits are DCT coefficients in row-major order and
    neighbouring ones are correlated (the DC bit is nearly always 1), so contiguous bands have
    uneven entropy and some collide far more often; striding spreads that evenly. For m bands
    band b gets the widths _plan_bands assumed (the first nbits % m bands one bit more).
    """
    nbytes = (nbits + 7) // 8
    raw = b"".join(v.to_bytes(nbytes, "big") for v in values)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8).reshape(len(values), nbytes), axis=1)
    bits = bits[:, bits.shape[1] - nbits :]  # [n, nbits], column k = bit (nbits - 1 - k)
    per_band: list[list[int]] = []
    for b in range(m):
        # Column j of the band becomes bit j of its key (any fixed bijection works: probing
        # flips key bits, and key Hamming distance equals band Hamming distance).
        packed = np.packbits(bits[:, b::m], axis=1, bitorder="little")  # [n, ceil(width / 8)]
        if packed.shape[1] <= 8:
            words = np.zeros((len(values), 8), dtype=np.uint8)
            words[:, : packed.shape[1]] = packed
            per_band.append(words.view("<u8").ravel().tolist())
        else:
            per_band.append([int.from_bytes(row.tobytes(), "little") for row in packed])
    return list(zip(*per_band))


def _flip_masks(width: int, radius: int) -> list[int]:
    """All ints of ``width`` bits with at most ``radius`` bits set, fewest bits first."""
    masks = [0]
    frontier = [0]
    for _ in range(min(radius, width)):
        nxt = []
        for m in frontier:
            top = m.bit_length()  # add bits above the highest set bit, so each set is made once
            nxt.extend(m | (1 << b) for b in range(top, width))
        masks.extend(nxt)
        frontier = nxt
    return masks

"""Image files to uint8 RGB pixels, each decoded where it is fastest.

`decode_file` gives PIL's pixels for any file: JPEGs through simplejpeg (libjpeg-turbo like PIL, with PIL's
settings: accurate DCT, fancy upsampling; identical pixels, ~1.6-1.9x PIL per core, benchmarks/decode.py),
everything else, and every JPEG the fast path cannot take exactly as PIL would (CMYK, an orientation other
than 1, 12-bit, a decoder warning, ...), through PIL. `decode_jpegs` decodes a
batch on the device (nvJPEG on CUDA) through torchvision; `device_decodable` says which JPEGs it takes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from .errors import H2TError

try:
    import simplejpeg
except ImportError:  # not installed: every file goes through PIL, same pixels, slower
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
_SOFS = {0xC0, 0xC2}  # baseline and progressive Huffman: what nvJPEG decodes
_FRAME_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every SOFn (C4 DHT, C8 JPG, CC DAC are not)
_SAMPLINGS = {0x11, 0x21, 0x12, 0x22, 0x41, 0x42}  # luma h:v of 4:4:4 (and gray), 4:2:2, 4:4:0, 4:2:0, 4:1:1, 4:1:0
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")



def read_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise H2TError(f"missing image file {path}") from None
    except OSError as exc:
        raise H2TError(f"cannot read image {path}: {exc}") from None


def decode_file(path: Path, data: bytes | None = None) -> np.ndarray:
    """Any PIL-readable image file as uint8 (H, W, 3), exactly as `decode_with_pil`; `data`: its bytes if
    already read. A broken or missing file is an error naming it."""
    if data is None:
        data = read_file(path)
    if simplejpeg is not None and device_decodable(data):
        try:
            return simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False, strict=True)
        except ValueError:  # libjpeg-turbo warned (corrupt or truncated data) or failed: PIL decides
            pass
    return decode_with_pil(path)


def decode_with_pil(path: Path) -> np.ndarray:
    """Any PIL-readable image file as uint8 (H, W, 3); a broken or missing file is an error naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb_array(img, str(path))
    except FileNotFoundError:
        raise H2TError(f"missing image file {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise H2TError(f"cannot read image {path}: {exc}") from None


def to_rgb_array(img: Image.Image, what: str) -> np.ndarray:
    """A PIL image in any mode as uint8 (H, W, 3): 16-bit and 32-bit values scaled, palette expanded."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_MODES:
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
        img = Image.fromarray(np.clip(wide / top * 255.0, 0, 255).round().astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    out = np.array(img.convert("RGB"))  # a writable copy: asarray would view PIL's bytes, which torch cannot wrap
    if out.ndim != 3 or out.shape[0] < 1 or out.shape[1] < 1:
        raise H2TError(f"image {what} has no pixels (shape {out.shape})")
    return out


def device_decodable(data: bytes) -> bool:
    """A complete (EOI-terminated) 8-bit baseline or progressive JPEG, grayscale or YCbCr with a usual chroma
    subsampling, orientation 1 or none (EXIF and XMP), within PIL's pixel limit: what both fast decoders take
    without PIL's help. Only the header is read (a few microseconds); anything unusual answers False."""
    if data[:3] != JPEG_MAGIC or data[-2:] != _EOI:
        return False
    pos, end, frame, adobe_transform, exif_seen = 2, len(data), None, None, False
    while pos + 4 <= end:
        if data[pos] != 0xFF or not 0xC0 <= data[pos + 1] <= 0xFE or 0xD0 <= data[pos + 1] <= 0xD9:
            return False  # fill bytes, stray data or a marker without a length before the scan
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return False
        body = data[pos + 4:pos + 2 + length]
        if marker == 0xDA:  # start of scan: the header is complete
            return frame is not None and _plain_frame(frame, adobe_transform)
        if marker in _FRAME_MARKERS:
            if frame is not None or marker not in _SOFS:
                return False
            frame = body
        elif marker == 0xE1:
            if body.startswith(b"Exif\0\0"):  # PIL joins a second EXIF block to the first: let it
                if exif_seen or _exif_orientation(body[6:]) != 1:
                    return False
                exif_seen = True
            elif b"tiff:Orientation" in body:  # XMP orientation, which PIL also applies
                return False
        elif marker == 0xE2 and (body.startswith(b"MPF\0") or body.startswith(b"ICC_PROFILE\0") and len(body) < 14):
            return False  # multi-picture files and broken ICC chunks: PIL's own checks apply
        elif marker == 0xEE and body.startswith(b"Adobe") and len(body) > 11:
            adobe_transform = body[11]
        pos += 2 + length
    return False


def _plain_frame(frame: bytes, adobe_transform: int | None) -> bool:
    if len(frame) < 6:
        return False
    precision, count = frame[0], frame[5]
    height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
    if precision != 8 or not height or not width or count not in (1, 3) or len(frame) != 6 + 3 * count:
        return False
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        return False  # PIL warns or refuses: let it
    if frame[7] not in _SAMPLINGS:
        return False
    if count == 3:  # YCbCr only (RGB-coded JPEGs are marked by Adobe transform 0 or component ids R, G, B)
        return frame[10] == frame[13] == 0x11 and adobe_transform != 0 and frame[6:15:3] != b"RGB"
    return True


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation in an EXIF block's first directory: 1 when absent, None when the block is unusual."""
    order: Literal["little", "big"] | None = {b"II*\0": "little", b"MM\0*": "big"}.get(tiff[:4])  # type: ignore[assignment]
    if order is None:
        return None
    start = int.from_bytes(tiff[4:8], order)
    if start < 8 or start + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[start:start + 2], order)
    if start + 2 + 12 * count > len(tiff):
        return None
    tag, found = (0x0112).to_bytes(2, order), []
    for entry in range(start + 2, start + 2 + 12 * count, 12):
        if tiff[entry:entry + 2] == tag:
            if tiff[entry + 2:entry + 8] != (3).to_bytes(2, order) + (1).to_bytes(4, order):  # one SHORT
                return None
            found.append(int.from_bytes(tiff[entry + 8:entry + 10], order))
    return 1 if not found else found[0] if len(found) == 1 else None


def decode_jpegs(datas: list[bytes], device, names: list[str]) -> list:
    """JPEG bytes -> (3, H, W) uint8 tensors on `device`, decoded in one batch there (nvJPEG on CUDA; the same
    call on the CPU). A file that fails is looked for one at a time and named. Pass only `device_decodable`
    data: CMYK and rotated JPEGs come out unlike PIL's."""
    for data, name in zip(datas, names):
        if data[:3] != JPEG_MAGIC or data[-2:] != _EOI:
            raise H2TError(f"cannot read image {name}: not a complete JPEG (no SOI at the start or EOI at the end)")
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]  # a writable copy
    if not encoded:
        return []
    try:
        return decode_jpeg(encoded, device=device, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        images = []
        for tensor, name in zip(encoded, names):
            try:
                images.append(decode_jpeg(tensor, device=device, mode=ImageReadMode.RGB))
            except (RuntimeError, ValueError) as exc:
                raise H2TError(f"cannot read image {name}: {_reason(exc)}") from None
        return images  # the batch failed as a whole (memory?) but every image decodes alone


def _reason(exc: Exception) -> str:
    """torchvision's first line, without its 'decode_jpeg, <source file>:<line>, ' prefix."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return line.split(", ", 2)[-1] if line.startswith("decode_jpeg, ") else line

"""Image files to pixel arrays of a model's input size, with DALI: what batch prediction reads.

Each file is read and its header checked here (PNG or JPEG, sane size) before DALI sees
it; `Decoder` decodes batches with DALI's image decoder (``mixed`` on a GPU, ``cpu``
otherwise) and resizes them with ``fn.resize``. A file that cannot be used yields a
reason instead of pixels, never an exception, so one bad file never costs the batch.

How files become the model's input (measured with DALI 2.4):

- Color: a grayscale file for an RGB model has its gray value copied into R, G and B; an
  RGB (or palette, or CMYK JPEG) file for a grayscale model becomes its luma (ITU-R
  BT.601, 0.299 R + 0.587 G + 0.114 B, within 1 of the exact value). An alpha channel is
  dropped, not blended: transparent pixels keep their color.
- 16-bit PNG: scaled to 8 bits as round(v / 257), the whole 16-bit range onto 0..255
  (what a 16-bit export of an 8-bit image gives back exactly).
- Size: stretched to the model's height and width (aspect ratio not kept), linear
  interpolation with antialiasing; an image of the right size passes unchanged.

A DALI pipeline that fails on one sample is unusable afterwards ("Current pipeline object
is no longer valid"), so pipelines run synchronously (the error belongs to the batch just
run) and a failed batch is decoded again one image at a time, each failure in a fresh
pipeline: the good images of that batch are kept.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.startup import routed_stderr_lines

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
MAX_FILE_BYTES = 64 * 2**20  # larger files are refused unread
MAX_PIXELS = 8192 * 8192  # per image, from its header: a decompression-bomb guard
DECODE_BATCH = 64  # images per DALI run
BATCH_PIXELS = 2**26  # decoded pixels per DALI run at most (~200 MB of RGB at full size)
# PNG color type -> (color, channels, allowed bit depths), from the PNG specification.
PNG_COLOR_TYPES = {
    0: ("gray", 1, (1, 2, 4, 8, 16)),
    2: ("RGB", 3, (8, 16)),
    3: ("palette", 3, (1, 2, 4, 8)),
    4: ("gray+alpha", 2, (8, 16)),
    6: ("RGBA", 4, (8, 16)),
}
JPEG_COLORS = {1: "gray", 3: "RGB", 4: "CMYK"}  # by component count
# Start-of-frame markers (baseline, progressive, lossless, arithmetic); not C4, C8, CC.
JPEG_FRAME_MARKERS = frozenset(
    (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
)
WITHOUT_ALPHA = {"gray+alpha": "gray", "RGBA": "RGB"}
# How the decoding libraries' messages start (nvImageCodec's, libpng's, libjpeg's).
DECODER_LOG_PREFIXES = ("[ERROR]", "[WARNING]", "libpng ", "Corrupt JPEG", "Premature end of JPEG")
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says."""

    kind: str  # "PNG" or "JPEG"
    width: int
    height: int
    color: str  # gray, gray+alpha, RGB, RGBA, palette, CMYK
    bit_depth: int  # bits per sample (a palette PNG: per index)

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    info: ImageInfo


def list_files(path: Path) -> list[Path]:
    """``path`` itself when it is not a directory; else every file under it, sorted.

    Names starting with '.' (.gitignore, .DS_Store) are skipped, and links to directories
    are not followed; links to files are listed (read_image decides about them).
    """
    if not path.is_dir():
        return [path]
    found = []
    for folder, dirs, files in os.walk(path):  # followlinks=False
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [Path(folder) / name for name in files if not name.startswith(".")]
    return sorted(found)


def has_image_signature(path: Path) -> bool:
    """Whether the file starts like a PNG or a JPEG (8 bytes read; False if unreadable or
    not a regular file: opening a FIFO would wait for a writer)."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(len(PNG_SIGNATURE))
    except OSError:
        return False
    return head.startswith((PNG_SIGNATURE, JPEG_SIGNATURE))


def read_image(path: Path, within: Path | None = None) -> EncodedImage | str:
    """The file's bytes and header, or the reason it cannot be used.

    ``within``: refuse a file (a link) whose real location is outside that directory,
    unread, so a deployment run reads nothing outside the project.
    """
    if within is not None and not path.resolve().is_relative_to(within.resolve()):
        return f"a link to a file outside {within}: not read"
    if not path.is_file():
        return "not a regular file" if path.exists() else "no such file (a dangling link?)"
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return f"{size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit"
        data = path.read_bytes()
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    info = image_info(data)
    return EncodedImage(data, info) if isinstance(info, ImageInfo) else info


def image_info(data: bytes) -> ImageInfo | str:
    """The header of a PNG or JPEG file, or why it is not a usable one."""
    if not data:
        return "empty file"
    if data.startswith(PNG_SIGNATURE):
        info = _png_info(data)
    elif data.startswith(JPEG_SIGNATURE):
        info = _jpeg_info(data)
    else:
        return "not a PNG or JPEG image"
    if isinstance(info, str):
        return info
    if info.pixels == 0:
        return f"{info.kind} of {info.width}x{info.height} pixels: no pixels"
    if info.pixels > MAX_PIXELS:
        return (
            f"{info.kind} of {info.width}x{info.height} pixels, over the limit of "
            f"{MAX_PIXELS} pixels (8192x8192)"
        )
    return info


def _png_info(data: bytes) -> ImageInfo | str:
    # Signature (8 bytes), then the IHDR chunk: length (4), type (4), 13 bytes of data.
    if len(data) < 29 or data[12:16] != b"IHDR":
        return "PNG without an IHDR header (truncated or corrupt)"
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    if color_type not in PNG_COLOR_TYPES:
        return f"PNG with an invalid color type {color_type} (corrupt)"
    color, _, depths = PNG_COLOR_TYPES[color_type]
    if depth not in depths:
        return f"PNG with an invalid bit depth {depth} for {color} (corrupt)"
    return ImageInfo("PNG", width, height, color, depth)


def _jpeg_info(data: bytes) -> ImageInfo | str:
    """Walk the marker segments after SOI to the frame header (SOFn)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        if marker in JPEG_FRAME_MARKERS:
            if pos + 10 > len(data):
                break
            depth, height, width, components = struct.unpack(">BHHB", data[pos + 4 : pos + 10])
            if components not in JPEG_COLORS:
                return f"JPEG with {components} color components (only 1, 3 or 4 are images)"
            return ImageInfo("JPEG", width, height, JPEG_COLORS[components], depth)
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return "JPEG without a frame header (truncated or corrupt)"


def conversions(info: ImageInfo, shape: tuple[int, int, int]) -> str:
    """What happens to this file on its way to a model input of ``shape`` (H, W, C), as a
    short note for the predictions file ("" when nothing does)."""
    height, width, channels = shape
    target = "gray" if channels == 1 else "RGB"
    notes = []
    color = WITHOUT_ALPHA.get(info.color, info.color)
    if color != target and (color, target) != ("palette", "RGB"):
        notes.append(f"{color} to {target}")
    if info.color in WITHOUT_ALPHA:
        notes.append("alpha dropped")
    if info.bit_depth == 16:
        notes.append("16-bit to 8-bit")
    if (info.height, info.width) != (height, width):
        notes.append(f"resized {info.width}x{info.height} to {width}x{height}")
    return "; ".join(notes)


def decode_failure(error: Exception, messages: list[str]) -> str:
    """One line for a DALI decoding error: the decoder library's own message when it
    printed one (libpng's "IDAT: incorrect data check"), else DALI's, without the pipeline
    traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if "pipeline" not in line and not line.startswith("File ")]
    cause = (messages or causes or lines or [type(error).__name__])[-1]
    return f"DALI could not decode it (corrupt, truncated or unsupported data: {cause[:200]})"


@contextmanager
def decoder_messages() -> Iterator[list[str]]:
    """The lines the decoding libraries (nvImageCodec, libpng, libjpeg) print on file
    descriptor 2 inside the block, instead of on the terminal; anything else printed
    there meanwhile is written back."""
    messages: list[str] = []

    def take(line: str) -> bool:
        plain = ANSI_CODES.sub("", line).strip()
        if not plain.startswith(DECODER_LOG_PREFIXES):
            return False
        messages.append(plain.removeprefix("[ERROR]").removeprefix("[WARNING]").strip())
        return True

    with routed_stderr_lines(take):
        yield messages


class Decoder:
    """Encoded PNG/JPEG files to uint8 (H, W, C) arrays of one size, with DALI.

    ``device``: "gpu" decodes with nvImageCodec's mixed (CPU+GPU) decoder and resizes on
    the GPU; "cpu" does both on the CPU.
    """

    def __init__(self, shape: tuple[int, int, int], device: str, num_threads: int = 2) -> None:
        height, width, channels = shape
        if channels not in (1, 3):
            raise ValueError(f"images have 1 or 3 channels, not {channels}")
        self.shape, self.device, self.num_threads = (height, width, channels), device, num_threads
        self._pipelines: dict[int, Any] = {}  # batch size -> a pipeline that has not failed

    def decode(self, images: Sequence[EncodedImage]) -> list[np.ndarray | str]:
        """Pixels for each image, in order, or the reason it could not be decoded."""
        results: list[np.ndarray | str] = []
        for batch in _batches(images):
            try:
                with decoder_messages():  # reported per image below if the batch fails
                    results += self._run(batch)
            except RuntimeError:  # some image in it is bad: find which, keep the others
                results += [self._decode_alone(image) for image in batch]
        return results

    def _decode_alone(self, image: EncodedImage) -> np.ndarray | str:
        with decoder_messages() as messages:
            try:
                return self._run([image])[0]
            except RuntimeError as error:
                failure = error
        return decode_failure(failure, messages)

    def _run(self, batch: list[EncodedImage]) -> list[np.ndarray]:
        size = DECODE_BATCH if len(batch) > 1 else 1
        pipe = self._pipelines.get(size) or self._build(size)
        self._pipelines[size] = pipe
        try:
            pipe.feed_input("encoded", [np.frombuffer(image.data, np.uint8) for image in batch])
            (pixels,) = pipe.run()
        except RuntimeError:
            del self._pipelines[size]  # DALI: "Current pipeline object is no longer valid"
            raise
        if hasattr(pixels, "as_cpu"):  # a GPU batch
            pixels = pixels.as_cpu()
        return list(pixels.as_array())

    def _build(self, batch_size: int) -> Any:
        from nvidia.dali import Pipeline, fn, types

        height, width, channels = self.shape
        pipe = Pipeline(
            batch_size=batch_size,
            num_threads=self.num_threads,
            # Without CUDA, DALI needs device_id=None, even for an all-CPU pipeline.
            device_id=0 if self.device == "gpu" else None,
            # Synchronous: a decoding error is raised by the run of the batch it is in.
            exec_async=False,
            exec_pipelined=False,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            pixels = fn.decoders.image(
                encoded,
                device="mixed" if self.device == "gpu" else "cpu",
                output_type=types.GRAY if channels == 1 else types.RGB,
            )
            pixels = fn.resize(
                pixels, size=[height, width], interp_type=types.INTERP_LINEAR, antialias=True
            )
            pipe.set_outputs(pixels)
        pipe.build()
        return pipe


def _batches(images: Sequence[EncodedImage]) -> list[list[EncodedImage]]:
    """Runs of at most DECODE_BATCH images and BATCH_PIXELS decoded pixels (an image over
    the pixel budget goes alone)."""
    batches: list[list[EncodedImage]] = []
    current: list[EncodedImage] = []
    pixels = 0
    for image in images:
        if current and (len(current) == DECODE_BATCH or pixels + image.info.pixels > BATCH_PIXELS):
            batches.append(current)
            current, pixels = [], 0
        current.append(image)
        pixels += image.info.pixels
    if current:
        batches.append(current)
    return batches

"""Random-access sources of captioned images: a folder with same-named .txt captions, or a JSONL file.

Both are grain `RandomAccessDataSource`s (`__len__`, `__getitem__`). Item i is
`{"image": uint8 (H, W, 3) RGB, "caption": str, "index": i}` (plus "control", a JSONL's control image).
Bad data never raises:

- at index time (construction), an image without a caption (folder), or a JSONL line that does not parse
  or lacks a field, is left out of the source and listed in `source.skipped` as (what, reason);
- at read time, an image that cannot be decoded (or an empty caption) gives
  `{"skip": True, "reason": ..., "index": i, "path": ...}`, which the loader filters and counts
  (`sd3_jax.data.pipeline`).

Skip reasons are short fixed words (`SKIP_REASONS`), so counts stay a small dict; the detail goes to the log.
Any other object with `__len__` and `__getitem__` returning {"image", "caption"} (such as
`sd3_jax.data.shapes.ShapesDataset`) works with the loader unchanged.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SKIP_REASONS = (
    "missing_caption",  # folder: no same-stem .txt; JSONL: no or non-string "caption"
    "empty_caption",  # caption is empty or whitespace
    "missing_image",  # the image file does not exist (JSONL) or vanished since indexing
    "corrupt_image",  # the image file cannot be decoded
    "bad_line",  # JSONL: not a JSON object, or no string "image" field
    "missing_control",  # JSONL with control images: this line has none, or its file does not exist
    "corrupt_control",  # the control image cannot be decoded
)
_EXIF_ORIENTATION = 0x0112  # orientations 5-8 swap width and height


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to uint8 (H, W, 3) RGB, upright per its EXIF orientation.

    Images with transparency are composited onto white; palette and greyscale images are expanded; 16-bit
    greyscale (PIL modes I;16 and I) is scaled to 8 bits (v / 257, rounded), float greyscale (F) is read as
    [0, 1]; CMYK is converted by PIL.

    Raises:
      OSError or ValueError (PIL's errors) when the file is missing or cannot be decoded.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I") or im.mode == "F":  # PIL's convert() would clip these to 255
            a = np.asarray(im, np.float64)
            a = np.clip(a / 257.0 if im.mode != "F" else a * 255.0, 0, 255)
            return np.repeat(np.round(a).astype(np.uint8)[..., None], 3, axis=-1)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image after EXIF orientation, read from its header only.

    Raises:
      OSError or ValueError when the header cannot be read.
    """
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            w, h = h, w
        return w, h


def _read(index: int, path: Path, caption: str, control: Path | None = None) -> dict[str, Any]:
    """One record, or a skip record naming why it cannot be used. With `control`, the record carries that
    image too ("control", uint8 RGB), resized to the image's size where it differs."""
    caption = caption.strip()
    if not caption:
        return _skip(index, path, "empty_caption", "")
    try:
        image = load_image(path)
    except FileNotFoundError as e:
        return _skip(index, path, "missing_image", str(e))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        return _skip(index, path, "corrupt_image", f"{type(e).__name__}: {e}")
    out = {"image": image, "caption": caption, "index": index}
    if control is not None:
        try:
            c = load_image(control)
        except FileNotFoundError as e:
            return _skip(index, control, "missing_control", str(e))
        except Exception as e:  # as for the image
            return _skip(index, control, "corrupt_control", f"{type(e).__name__}: {e}")
        if c.shape != image.shape:
            c = np.asarray(Image.fromarray(c).resize(image.shape[1::-1], Image.BICUBIC))
        out["control"] = c
    return out


def _skip(index: int, path: Path, reason: str, detail: str) -> dict[str, Any]:
    log.warning("skipping record %d (%s): %s %s", index, path, reason, detail)
    return {"skip": True, "reason": reason, "index": index, "path": str(path)}


class _ImageCaptionSource:
    """Shared behaviour: a list of (image path, caption or caption file) and the index-time skips."""

    paths: list[Path]
    skipped: list[tuple[str, str]]  # (path or "file:line", reason) left out at index time

    def __len__(self) -> int:
        return len(self.paths)

    def _caption(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} items")
        try:
            caption = self._caption(index)
        except (OSError, UnicodeError) as e:
            return _skip(index, self.paths[index], "missing_caption", str(e))
        return _read(index, self.paths[index], caption, self._control(index))

    def _control(self, index: int) -> Path | None:
        return None

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of item `index` from its header. Raises OSError/ValueError if unreadable."""
        return image_size(self.paths[index])

    @property
    def skip_counts(self) -> dict[str, int]:
        """Number of items left out at index time, per reason."""
        return dict(collections.Counter(reason for _, reason in self.skipped))


class ImageCaptionFolder(_ImageCaptionSource):
    """Images under a folder (recursively), each captioned by the .txt file with the same stem beside it.

    Items are ordered by relative path. An image without a caption file is left out and listed in
    `skipped` with reason "missing_caption".
    """

    def __init__(self, root: str | os.PathLike):
        """Indexes the folder: lists images and checks that their caption files exist.

        Args:
          root: folder to scan; suffixes in IMAGE_SUFFIXES (any case) are images.
        """
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.paths, self.skipped = [], []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            names = set(filenames)
            for name in sorted(filenames):
                stem, suffix = os.path.splitext(name)
                if suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                path = Path(dirpath) / name
                if stem + ".txt" in names:
                    self.paths.append(path)
                else:
                    self.skipped.append((str(path), "missing_caption"))
        self.paths.sort(key=lambda p: p.relative_to(self.root).as_posix())
        if self.skipped:
            log.warning("%s: %d images without a caption left out", self.root, len(self.skipped))

    def _caption(self, index: int) -> str:
        return self.paths[index].with_suffix(".txt").read_text(encoding="utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ImageCaptionFolder({str(self.root)!r}, {len(self)} items, {len(self.skipped)} skipped)"


class JsonlSource(_ImageCaptionSource):
    """A JSON-lines file of {"image": path, "caption": text[, "control": path]}; relative paths are against
    the file's folder.

    Blank lines are ignored. A line that is not a JSON object with a string "image" is left out with reason
    "bad_line"; one without a string "caption" with "missing_caption". When any line has a "control" image
    (ControlNet training data), lines without one are left out with "missing_control". Existence of the
    image files is checked at read time, not here.
    """

    def __init__(self, path: str | os.PathLike):
        """Reads and validates every line.

        Args:
          path: the .jsonl file.
        """
        self.path = Path(path)
        base = self.path.parent
        self.paths, self.captions, self.controls, self.skipped = [], [], [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    self.skipped.append((where, "bad_line"))
                elif not isinstance(row.get("caption"), str):
                    self.skipped.append((where, "missing_caption"))
                else:
                    self.paths.append(base / row["image"])  # an absolute path replaces base
                    self.captions.append(row["caption"])
                    control = row.get("control")
                    self.controls.append((base / control, where) if isinstance(control, str) else where)
        if any(isinstance(c, tuple) for c in self.controls):  # ControlNet data: every line needs one
            keep = [i for i, c in enumerate(self.controls) if isinstance(c, tuple)]
            self.skipped += [(c, "missing_control") for c in self.controls if not isinstance(c, tuple)]
            self.paths, self.captions = [self.paths[i] for i in keep], [self.captions[i] for i in keep]
            self.controls = [self.controls[i][0] for i in keep]
        else:
            self.controls = []
        if self.skipped:
            log.warning("%s: %d lines left out: %s", self.path, len(self.skipped), self.skip_counts)

    def _caption(self, index: int) -> str:
        return self.captions[index]

    def _control(self, index: int) -> Path | None:
        return self.controls[index] if self.controls else None

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, {len(self)} items, {len(self.skipped)} skipped)"


def open_source(path: str | os.PathLike) -> Sequence[dict[str, Any]]:
    """The source a path names: a folder, a .jsonl file, or a prepared record set (`prefix` of prefix.json).

    Raises:
      FileNotFoundError: when the path is none of these.
    """
    p = Path(path)
    if p.is_dir():
        return ImageCaptionFolder(p)
    if p.suffix == ".jsonl" and p.is_file():
        return JsonlSource(p)
    from sd3_jax.data import records  # records imports grain and array_record; only load when needed

    if records.index_path(p).is_file():
        return records.PreparedSource(p)
    raise FileNotFoundError(f"{p} is not an image folder, a .jsonl file, or a prepared record prefix")

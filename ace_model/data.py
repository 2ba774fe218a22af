"""Data for ACE-LoRA: tokenizer, image preprocessing, CSV datasets, a synthetic demo set.

CSV layout (:class:`CSVImageTextDataset`): one row per image, a column with the image
path (absolute, or relative to ``image_root``, default the CSV's directory), a column
with the report text, and label columns (0/1; -1 and a missing value count as 0, as the
reference does with CheXpert's missing and uncertain labels: empty, NaN, or another cell
pandas reads as missing, such as R's NA or null; any other value, e.g. 2 or 0.5, is an
error naming its row and column).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import html
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ace_kernels._checks import check_positive_int

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(ValueError):
    """A dataset file or one of its rows is unusable; the message names the file and row."""


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """What open_clip's HFTokenizer does to a text before tokenising it (its default
    "whitespace" cleaning): ``ftfy.fix_text``, HTML entities unescaped twice, whitespace runs
    collapsed to one space, ends stripped. Without ftfy (open_clip needs it, so it is there
    wherever open_clip is) the ``fix_text`` step is skipped: that changes only mis-decoded
    text, and a one-time warning says so."""
    global _FTFY
    if _FTFY is None:
        try:
            import ftfy

            _FTFY = ftfy.fix_text
        except ImportError:
            warnings.warn("ftfy is not installed: texts are tokenised without ftfy.fix_text (open_clip's "
                          "tokenizer applies it); only mis-decoded text (mojibake) tokenises differently",
                          RuntimeWarning, stacklevel=3)
            _FTFY = False
    if _FTFY:
        text = _FTFY(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split())


_FTFY = None  # ftfy.fix_text once imported, False when ftfy is missing


class TextTokenizer:
    """WordPiece tokenizer padded/truncated to a fixed context, as open_clip's HFTokenizer.

    ``tok(["text", ...]) -> LongTensor [B, context_length]`` with ``[CLS] ... [SEP]``
    then ``[PAD]`` (id 0).

    Parameters
    ----------
    directory : path
        An HF tokenizer directory (``vocab.txt`` and/or ``tokenizer.json``).
    context_length : int
    image_size : int, optional
        The input size of the model this tokenizer belongs to; lets a dataset built from
        the tokenizer alone preprocess images for the right model.
    """

    def __init__(self, directory: str | os.PathLike, context_length: int, image_size: int | None = None):
        self.directory = str(directory)
        self.context_length = int(context_length)
        self.image_size = image_size
        self._hf = _load_hf_tokenizer(self.directory)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, (str, bytes, bytearray)) else list(texts)
        for item in texts:  # no str(): a missing report (None, NaN) or bytes would become other words
            if not isinstance(item, str):
                raise ValueError(f"argument 'texts': expected a string or a sequence of strings, got "
                                 f"{type(item).__name__} {item!r:.40}")
        texts = [clean_text(t) for t in texts]
        if not texts:
            raise ValueError("argument 'texts': expected a string or a non-empty sequence of strings, got none")
        length = int(context_length or self.context_length)
        out = self._hf(texts, max_length=length, padding="max_length", truncation=True, return_tensors="pt")
        return out["input_ids"].long()

    def __getstate__(self):
        # Picklable for DataLoader workers: the HF object is rebuilt in the worker.
        state = dict(self.__dict__)
        state.pop("_hf")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._hf = _load_hf_tokenizer(self.directory)


def _load_hf_tokenizer(directory: str):
    """``AutoTokenizer.from_pretrained(directory)``; a folder whose ``tokenizer_config.json`` names no
    ``tokenizer_class`` (or that has none: PubMedBERT's ``vocab.txt`` or ``tokenizer.json`` put beside
    BiomedCLIP's weights) is read as BERT's, the text towers' tokenizer. AutoTokenizer cannot tell
    what a lone ``vocab.txt`` is, and makes a lone ``tokenizer.json`` a tokenizer without a padding token.
    A ``tokenizer_config.json`` that is not a JSON object is a ValueError naming it."""
    from transformers import AutoTokenizer

    config = os.path.join(directory, "tokenizer_config.json")
    try:
        with open(config, encoding="utf-8") as handle:
            settings = json.load(handle)
    except (FileNotFoundError, NotADirectoryError):  # none (or no folder: AutoTokenizer names the problem)
        settings = {}
    except (OSError, ValueError) as exc:
        # AutoTokenizer reads the same file and fails on it with a bare JSON error (or a TypeError
        # for JSON that is not an object) that names no file.
        raise ValueError(f"tokenizer config {config!r} cannot be read as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"tokenizer config {config!r} is not a JSON object of tokenizer settings (it holds a "
                         f"{type(settings).__name__})")
    named = bool(settings.get("tokenizer_class"))
    return AutoTokenizer.from_pretrained(directory, **({} if named else {"tokenizer_type": "bert"}))


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------


def preprocess_image(image, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, *, crop: bool = False) -> torch.Tensor:
    """PIL image -> ``[3, S, S]`` float tensor, CLIP mean/std.

    ``crop=False``: RGB, bicubic resize to S x S (the reference's training transform, which
    squashes the aspect ratio). ``crop=True``: bicubic resize of the shorter side to S, the
    central S x S, then RGB (open_clip's evaluation transform, which the reference's zero-shot
    scripts use: torchvision's ``Resize(S)`` and ``CenterCrop(S)``, their size and offset
    rounding included).
    """
    from PIL import Image

    if crop:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        if short != image_size:
            new_short, new_long = image_size, int(image_size * long / short)
            size = (new_short, new_long) if width <= height else (new_long, new_short)
            image = image.resize(size, Image.BICUBIC)
        width, height = image.size
        if (width, height) != (image_size, image_size):
            top, left = int(round((height - image_size) / 2.0)), int(round((width - image_size) / 2.0))
            image = image.crop((left, top, left + image_size, top + image_size))
        image = image.convert("RGB")
    else:
        image = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    # On the image's device (the CPU), not on a default device set with torch.set_default_device.
    mean_t = torch.tensor(mean, dtype=torch.float32, device=tensor.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=tensor.device)[:, None, None]
    return (tensor - mean_t) / std_t


_WIDE_MODES_WARNED: set = set()  # one warning per image mode and process, not one per file


def _warn_if_clipped(mode: str, path) -> None:
    """16- and 32-bit images (PIL modes I;16*, I, F: medical PNGs from DICOM often are) lose
    everything above 255 in ``convert("RGB")``, as in the reference's preprocessing, which this
    reproduces: say so once, naming the first such file."""
    if (mode.startswith("I;16") or mode in ("I", "F")) and mode not in _WIDE_MODES_WARNED:
        _WIDE_MODES_WARNED.add(mode)
        warnings.warn(f"image file {os.fspath(path)!r} is {mode} (more than 8 bits): like the reference's "
                      "preprocessing (PIL's convert('RGB')), values above 255 become white; convert such images "
                      "to 8 bits first (e.g. scaled by their maximum) to keep their range", stacklevel=3)


def _image_file(csv_path, number: int, column: str, name: str, root: Path) -> Path:
    """The image file a CSV row names (relative to ``root``), or a DataError naming the row."""
    if not name:
        raise DataError(f"{csv_path}, row {number}: column {column!r} is empty")
    path = Path(name)
    if not path.is_absolute():
        path = root / path
    try:
        # stat() raises for a name too long for the file system (a report text in the image
        # column) or a folder the user may not enter; Path.is_dir() passes those errors on.
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:
        raise DataError(f"{csv_path}, row {number}: image file {name!r} cannot be looked up ({str(path)!r}: "
                        f"{exc.strerror or exc})") from None
    if is_dir:
        raise DataError(f"{csv_path}, row {number}: image {name!r} is a directory ({str(path)!r}), not an image file")
    if not is_file:
        raise DataError(f"{csv_path}, row {number}: image file {name!r} not found (looked for {str(path)!r})")
    return path


def load_image(path: str | os.PathLike, image_size: int, *, where: str = "", crop: bool = False) -> torch.Tensor:
    """Open and preprocess one image (``crop``: see :func:`preprocess_image`); a missing or
    unreadable file raises :class:`DataError` naming ``where`` (e.g. the CSV row) and the file."""
    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise DataError(f"{prefix}image file {os.fspath(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            _warn_if_clipped(image.mode, path)
            return preprocess_image(image, image_size, crop=crop)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{prefix}image file {os.fspath(path)!r} cannot be read as an image "
                        f"({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------------------
# CSV datasets
# ----------------------------------------------------------------------------------------


def read_csv(csv_path: str | os.PathLike, required: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Read a UTF-8 CSV with a header (a byte-order mark is allowed).

    Empty names at the end of the header (a trailing comma) are dropped, and the fields
    under them must be empty, as a trailing comma in a row is allowed.

    Raises :class:`DataError` naming the file and: every missing required column; a column
    named twice; a column with an empty name that is not at the end of the header (its
    position, from 1); the row (numbered from 1 after the header) and its file line(s) when it
    has fewer fields than the header or more non-empty ones (an empty surplus field, from a
    trailing comma, is ignored); the line of the first byte that is not UTF-8; a malformed
    line (e.g. an unterminated quote); a file with no header (empty, or blank lines only). A header
    separated by ';', tabs or '|' and a UTF-16 or UTF-32 file are said to be such.
    Blank lines (empty, or spaces and tabs alone) before the header and among the rows are skipped.
    """
    csv_path = os.fspath(csv_path)
    if os.path.isdir(csv_path):
        raise DataError(f"CSV file {csv_path!r} is a directory, expected a CSV file")
    if not os.path.isfile(csv_path):
        raise DataError(f"CSV file {csv_path!r} does not exist")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            # strict: an unterminated quote is an error, not a field that swallows the rest of the file.
            reader = csv.reader(handle, strict=True)
            header = next((fields for fields in reader if not _blank_record(fields)), [])
            if not header:
                raise DataError(f"CSV file {csv_path!r} is empty, expected a header naming its columns "
                                f"({', '.join(repr(c) for c in required) or 'any'}) and then rows")
            unnamed_tail = 0
            while header and not header[-1].strip():
                header.pop()
                unnamed_tail += 1
            unnamed = [position for position, name in enumerate(header, start=1) if not name.strip()]
            if unnamed:
                raise DataError(f"CSV file {csv_path!r}: header column {unnamed[0]} has an empty name, expected "
                                f"a column name (columns: {header})")
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise DataError(f"CSV file {csv_path!r} names column(s) {', '.join(repr(c) for c in repeated)} "
                                f"more than once (columns: {header})")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"CSV file {csv_path!r} is missing required column(s) "
                                f"{', '.join(repr(c) for c in missing)} (found columns: {header})"
                                f"{_near_names_hint(missing, header)}{_separator_hint(missing, header)}")
            rows = []
            number = 0
            last_line = reader.line_num  # a row starts on the line after the last one read
            for fields in reader:
                first_line, last_line = last_line + 1, reader.line_num
                if _blank_record(fields):  # a blank line, skipped as csv.DictReader and pandas do
                    continue
                number += 1
                # Empty surplus fields (a trailing comma, or the column of a trailing comma
                # in the header) are allowed.
                surplus = [value for value in fields[len(header):] if value.strip()]
                if surplus or len(fields) < len(header):
                    count = min(len(fields), len(header)) + len(surplus)
                    note = (f" (the header's {unnamed_tail} unnamed trailing column(s) must be empty)"
                            if surplus and unnamed_tail else "")
                    # A quoted field (a report) may span lines: name them all, not the last alone.
                    lines = f"line {last_line}" if first_line == last_line else f"lines {first_line}-{last_line}"
                    raise DataError(f"{csv_path}, row {number} ({lines}): {count} field(s), "
                                    f"expected {len(header)}, one per column {header}{note}")
                rows.append(dict(zip(header, fields)))
    except UnicodeDecodeError:
        raise DataError(f"CSV file {csv_path!r} is not UTF-8 text: {_first_non_utf8(csv_path)}; "
                        "save it as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"CSV file {csv_path!r}, line {reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"CSV file {csv_path!r} has a header but no rows")
    return header, rows


def _blank_record(fields: list[str]) -> bool:
    """A blank line: no field at all, or (spaces or tabs alone on the line) one field of whitespace,
    which pandas.read_csv also skips; read as a header it would name no column, as a row it would
    be one field short of every column."""
    return not fields or (len(fields) == 1 and not fields[0].strip())


def _near_names_hint(missing: Sequence[str], header: Sequence[str]) -> str:
    """Names match exactly, as pandas reads them; this names the header columns that would have
    matched a missing one but for surrounding spaces or letter case (``"image, text"``)."""
    near = [f"{found!r} for {wanted!r}" for wanted in missing for found in header
            if found != wanted and found.strip().lower() == wanted.lower()]
    return f"; names must match exactly, check {', '.join(near)}" if near else ""


def _separator_hint(missing: Sequence[str], header: Sequence[str]) -> str:
    """Columns are separated by commas; this names the separator a header holds the missing names
    behind instead (a spreadsheet's export in a locale whose decimal mark is the comma uses ';')."""
    for separator, name in ((";", "';'"), ("\t", "tabs"), ("|", "'|'")):
        parts = {part.strip() for field in header for part in field.split(separator)}
        if any(separator in field for field in header) and any(c in parts for c in missing):
            return f"; the header is separated by {name}, not commas: save the file comma-separated"
    return ""


def _rows_fingerprint(label_columns, rows) -> str:
    digest = hashlib.sha256(json.dumps(list(label_columns)).encode())
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _first_non_utf8(path: str) -> str:
    with open(path, "rb") as handle:
        data = handle.read()
    for marks, encoding in (((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE), "UTF-32"),
                            ((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE), "UTF-16")):
        if data.startswith(marks):
            return f"it is {encoding} (it starts with {encoding}'s byte-order mark)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"byte 0x{data[exc.start]:02x} at line {line} ({exc.reason})"
    return "a byte that is not UTF-8"


# The cells pandas.read_csv reads as missing by default (the reference reads its CSVs with pandas and fills
# missing labels with 0): R's NA, SQL's NULL, Python's None, spreadsheets' #N/A and the like.
_MISSING_LABELS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                             "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def _label_value(raw, csv_path: str, row_number: int, column: str) -> float:
    text = "" if raw is None else str(raw).strip()
    if text in _MISSING_LABELS or text.lower() == "nan":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (0.0, 1.0, -1.0):
        # Any other number (2, 0.5) is no label of the reference's CheXpert convention;
        # mapping it to 0 or 1 would silently change the loss's label mask.
        raise DataError(f"{csv_path}, row {row_number}: label column {column!r} holds {text!r}, "
                        f"expected 0, 1, -1, NaN or empty (or another of pandas' missing values: NA, null, ...)")
    # CheXpert convention of the reference: uncertain (-1) and missing count as negative.
    return 1.0 if value == 1.0 else 0.0


def _check_dataset_arguments(image_size, label_columns, *, size_optional: bool) -> None:
    """A dataset's ``image_size`` (an integer >= 1, or None where ``size_optional``: a default applies) and
    ``label_columns`` (a sequence of names: one string would be read as its characters, each a missing column)."""
    if image_size is not None or not size_optional:
        check_positive_int("image_size", image_size)
    if isinstance(label_columns, (str, bytes)):
        raise ValueError(f"argument 'label_columns': expected a sequence of column names, got the string "
                         f"{label_columns!r} (pass [{label_columns!r}] for one column)")


class CSVImageTextDataset(torch.utils.data.Dataset):
    """Image-report(-labels) pairs from a CSV: items ``(image [3,S,S], token_ids [L], labels [C])``.

    Parameters
    ----------
    csv_path : path
    tokenizer : callable
        ``tokenizer(list_of_str) -> LongTensor [n, L]``, e.g. ``ACELoRA.tokenizer()``.
    image_size : int, optional
        Side of the square model input; default: ``tokenizer.image_size``, else 224.
    image_column, text_column : str
        Default ``"image"`` and ``"text"``.
    label_columns : sequence of str, optional
        Default: every other column. With no label columns, items are
        ``(image, token_ids)`` and training uses the plain CLIP loss.
    image_root : path, optional
        Base of relative image paths; default the CSV's directory.

    Rows are numbered from 1 (the first row after the header) in error messages. The
    existence of every image file is checked when the dataset is built; an unreadable
    image fails when it is read, naming its row and file.

    :meth:`fingerprint` identifies the rows' content, which a resumed training run checks.
    """

    def __init__(self, csv_path: str | os.PathLike, tokenizer, image_size: int | None = None, *,
                 image_column: str = "image", text_column: str = "text",
                 label_columns: Sequence[str] | None = None, image_root: str | os.PathLike | None = None):
        _check_dataset_arguments(image_size, label_columns, size_optional=True)
        self.csv_path = os.fspath(csv_path)
        self.tokenizer = tokenizer
        self.image_size = int(image_size or getattr(tokenizer, "image_size", None) or 224)
        required = [image_column, text_column] + list(label_columns or [])
        header, rows = read_csv(self.csv_path, required)
        if label_columns is None:
            label_columns = [c for c in header if c not in (image_column, text_column)]
        self.label_columns = list(label_columns)
        root = Path(image_root) if image_root is not None else Path(self.csv_path).parent.resolve()
        self.image_paths: list[str] = []
        self.texts: list[str] = []
        names, labels = [], []
        for number, row in enumerate(rows, start=1):
            name = (row.get(image_column) or "").strip()
            path = _image_file(self.csv_path, number, image_column, name, root)
            names.append(name)
            self.image_paths.append(str(path))
            self.texts.append(row.get(text_column) or "")
            labels.append([_label_value(row.get(c), self.csv_path, number, c) for c in self.label_columns])
        # On the CPU (as the images are made) whatever torch.set_default_device says.
        self.labels = torch.tensor(labels, dtype=torch.float32, device="cpu").reshape(len(rows),
                                                                                    len(self.label_columns))
        self._fingerprint = _rows_fingerprint(self.label_columns, zip(names, self.texts, labels))

    def fingerprint(self) -> str:
        """A sha256 of the label column names and each row's image name (as the CSV gives it),
        text and parsed labels, in order: equal for the same rows wherever the files are, and
        different when a row, its order, a text or a label changes. Image bytes are not read.
        """
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        image = load_image(self.image_paths[index], self.image_size,
                           where=f"{self.csv_path}, row {index + 1}")
        token_ids = self.tokenizer([self.texts[index]])[0]
        if not self.label_columns:
            return image, token_ids
        return image, token_ids, self.labels[index]


class CSVImageLabelDataset(torch.utils.data.Dataset):
    """Images with label columns for zero-shot evaluation: items ``(image, labels [C])``, each
    image preprocessed with the evaluation transform (``preprocess_image(..., crop=True)``)."""

    def __init__(self, csv_path: str | os.PathLike, label_columns: Sequence[str], image_size: int, *,
                 image_column: str = "image", image_root: str | os.PathLike | None = None):
        _check_dataset_arguments(image_size, label_columns, size_optional=False)
        self.csv_path = os.fspath(csv_path)
        self.image_size = int(image_size)
        self.label_columns = list(label_columns)
        header, rows = read_csv(self.csv_path, [image_column] + self.label_columns)
        root = Path(image_root) if image_root is not None else Path(self.csv_path).parent.resolve()
        self.image_paths, labels = [], []
        for number, row in enumerate(rows, start=1):
            name = (row.get(image_column) or "").strip()
            path = _image_file(self.csv_path, number, image_column, name, root)
            self.image_paths.append(str(path))
            labels.append([_label_value(row.get(c), self.csv_path, number, c) for c in self.label_columns])
        self.labels = torch.tensor(labels, dtype=torch.float32, device="cpu")  # as above

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        # Zero-shot images get the evaluation transform (shorter side to S, central crop), as the
        # reference's zero-shot scripts preprocess them; training images are squashed to S x S.
        image = load_image(self.image_paths[index], self.image_size, where=f"{self.csv_path}, row {index + 1}",
                           crop=True)
        return image, self.labels[index]


# ----------------------------------------------------------------------------------------
# Synthetic demo data
# ----------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("cardiomegaly", "effusion", "pneumothorax", "edema")

_REPORT_TEMPLATES = (
    "Findings suggesting {c}.",
    "There is {c}.",
    "Frontal chest radiograph shows {c}.",
    "Impression: {c}, unchanged.",
    "a chest x-ray image of {c}.",
    "Evidence of {c} is seen.",
)


def _synthetic_image(class_index: int, size: int, rng: np.random.Generator):
    """A gray image whose pattern encodes the class: a bright disc, horizontal stripes,
    vertical stripes or a dark corner block, with random position jitter and noise."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 0.35 + 0.1 * rng.standard_normal((size, size)).astype(np.float32)
    jitter = rng.uniform(-0.1, 0.1, size=2)
    if class_index % 4 == 0:
        disc = ((yy - 0.5 - jitter[0]) ** 2 + (xx - 0.5 - jitter[1]) ** 2) < 0.06
        base = base + 0.5 * disc
    elif class_index % 4 == 1:
        base = base + 0.3 * (np.sin(2 * math.pi * 4 * (yy + jitter[0])) > 0)
    elif class_index % 4 == 2:
        base = base + 0.3 * (np.sin(2 * math.pi * 4 * (xx + jitter[1])) > 0)
    else:
        corner = (yy < 0.45 + jitter[0]) & (xx < 0.45 + jitter[1])
        base = base - 0.3 * corner
    pixels = (np.clip(base, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L")


def make_synthetic_dataset(directory: str | os.PathLike, n: int, *, image_size: int = 32, seed: int = 0,
                           classes: Sequence[str] = SYNTHETIC_CLASSES, name: str = "train") -> Path:
    """Write ``n`` synthetic image-report-label rows and return the CSV path.

    Each sample has one finding out of ``classes``: its image carries a class-specific
    pattern, its report mentions the finding in one of several phrasings, and its label
    columns (named after the classes) are one-hot. The CSV has columns ``image``,
    ``text`` and one column per class; images are PNG files under ``<directory>/<name>/``.

    Parameters
    ----------
    directory : path
    n : int
    image_size : int
    seed : int
        Same seed, same files.
    classes : sequence of str
    name : str
        Basename of the CSV and of the image folder.

    Raises
    ------
    ValueError
        Naming the argument, when ``n`` or ``image_size`` is not an integer >= 1, ``seed``
        not an integer >= 0 (NumPy's generator takes no other), ``classes`` not a sequence
        of distinct non-empty names, or ``name`` empty or more than one path component.
    """
    n = check_positive_int("n", n)
    image_size = check_positive_int("image_size", image_size)
    seed = check_positive_int("seed", seed, minimum=0)
    if isinstance(classes, str) or not all(isinstance(c, str) and c.strip() for c in classes) or not classes:
        raise ValueError(f"argument 'classes': expected a sequence of non-empty class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"argument 'classes': expected distinct class names, got {list(classes)!r}")
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name:
        raise ValueError(f"argument 'name': expected a plain file stem (no folder), got {name!r}")
    directory = Path(directory)
    image_dir = directory / name
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    text_rng = random.Random(seed)
    csv_path = directory / f"{name}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text", *classes])
        for index in range(n):
            label = index % len(classes)
            file_name = f"{name}/{index:05d}.png"
            _synthetic_image(label, image_size, rng).save(directory / file_name)
            report = text_rng.choice(_REPORT_TEMPLATES).format(c=classes[label])
            writer.writerow([file_name, report, *[int(j == label) for j in range(len(classes))]])
    return csv_path

"""Training data from files: LLaVA conversation JSON, caption JSONL and Hugging Face `datasets` (a folder
written by `save_to_disk`, or parquet files).

Every loader returns `list[Sample]` and fills a `SkipReport`. With `policy="error"` (the default: a broken
dataset should be noticed) the first bad record raises a `SampleError` naming the file, the record (line or
index) and what was expected and found; with `policy="skip"` it is counted under its reason and left out.

Images are not opened here. They stay paths (resolved against `image_root` and checked to exist, which is
cheap), encoded bytes, or PIL images; `kopru.data.encoding` opens them when it encodes the sample, so a
corrupt image file is found there ("unreadable_image").

Records are recognised by their keys, in every format:

- LLaVA: `{"id": ..., "image": "rel/path.jpg" | [paths] (optional), "conversations": [{"from": "human" |
  "gpt" | "system", "value": str}, ...]}`. "human" becomes role "user", "gpt" role "assistant" ("user" and
  "assistant" are accepted as they are). As LLaVA's own loader does, a record with images but no "<image>"
  anywhere in its turns gets one "<image>\\n" per image put in front of its first human turn; any other
  disagreement between placeholders and images is a "placeholder_mismatch".
- caption: `{"image": path | [paths], "caption": str}` ("text" is accepted for "caption"), read as
  `Sample.caption`: a user turn holding only the image(s) and the caption as the assistant turn.
"""

from __future__ import annotations

import glob
import json
import reprlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from kopru.data.sample import Sample
from kopru.image_processing import load_image

Policy = Literal["error", "skip"]
IMAGE_PLACEHOLDER = "<image>"

# Skip reasons: the keys of SkipReport.counts.
MISSING_IMAGE = "missing_image"
CORRUPT_JSON = "corrupt_json"
PLACEHOLDER_MISMATCH = "placeholder_mismatch"
MALFORMED = "malformed"  # a record without the fields its format needs
TOO_LONG = "too_long"
NO_LOSS_TOKENS = "no_loss_tokens"
UNREADABLE_IMAGE = "unreadable_image"
TEMPLATE_ERROR = "template_error"  # the chat template refused this conversation (e.g. roles not alternating)
UNENCODABLE_TEXT = "unencodable_text"  # text with no UTF-8 form (a lone surrogate), which no tokenizer takes
SKIP_REASONS = (MISSING_IMAGE, CORRUPT_JSON, PLACEHOLDER_MISMATCH, MALFORMED, TOO_LONG, NO_LOSS_TOKENS,
                UNREADABLE_IMAGE, TEMPLATE_ERROR, UNENCODABLE_TEXT)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_CAPTION_KEYS = ("caption", "text")
_IMAGE_KEYS = ("image", "images")
_DATASET_DIR_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


class SampleError(ValueError):
    """One unusable sample. `reason` is its SkipReport key; the message says where, what was expected and found."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{message} [{reason}]")
        self.reason = reason


@dataclass
class SkipReport:
    """Samples left out under `policy="skip"`, counted by reason, with the first few messages of each."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def record(self, error: SampleError) -> None:
        self.counts[error.reason] += 1
        kept = self.examples.setdefault(error.reason, [])
        if len(kept) < self.max_examples:
            kept.append(str(error))

    def handle(self, error: SampleError, policy: Policy) -> None:
        """Raise `error` under policy "error"; count it under "skip"."""
        if policy == "error":
            raise error
        self.record(error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.counts:
            return "no samples skipped"
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.counts.most_common())
        return f"skipped {self.total} sample(s): {reasons}"


def check_policy(policy: str) -> Policy:
    if policy not in ("error", "skip"):
        raise ValueError(f"policy must be 'error' or 'skip', found {policy!r}")
    return policy  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- dispatch
def load_samples(
    path: str | Path, image_root: str | Path | None = None, policy: Policy = "error"
) -> tuple[list[Sample], SkipReport]:
    """Samples from `path`, by its type: `.json` (LLaVA), `.jsonl` (caption or LLaVA records, one a line),
    `.parquet` or a glob of parquet files, or a `datasets.save_to_disk` folder (dataset_info.json / state.json).

    Relative image paths are resolved against `image_root`, by default the data file's folder.
    """
    check_policy(policy)
    text = str(path)
    if glob.has_magic(text):
        if not text.endswith(".parquet"):
            raise ValueError(f"a glob pattern must name parquet files (end in .parquet), found {text!r}")
        return load_parquet(text, image_root, policy)
    path = Path(path)
    if path.is_dir():
        if any((path / name).is_file() for name in _DATASET_DIR_FILES):
            return load_hf_dataset(path, image_root, policy)
        if any(path.glob("*.parquet")):
            return load_parquet(str(path / "*.parquet"), image_root, policy)
        raise ValueError(
            f"expected a datasets folder (with one of {list(_DATASET_DIR_FILES)}) or parquet files in {path}, "
            "found neither"
        )
    if not path.is_file():
        raise FileNotFoundError(f"expected a data file or folder at {path}, found nothing there")
    loaders = {".json": load_llava_json, ".jsonl": load_jsonl, ".parquet": load_parquet}
    loader = loaders.get(path.suffix.lower())
    if loader is None:
        raise ValueError(f"cannot tell the format of {path}: expected a .json, .jsonl or .parquet file or a folder")
    return loader(path, image_root, policy)


# -------------------------------------------------------------------------------------------------- loaders
def load_llava_json(
    path: str | Path, image_root: str | Path | None = None, policy: Policy = "error"
) -> tuple[list[Sample], SkipReport]:
    """A LLaVA conversation file: one JSON list of records (see the module docstring)."""
    check_policy(policy)
    path = Path(path)
    # The whole file is unusable in each case below, so it is raised under either policy: no record to skip.
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SampleError(
            CORRUPT_JSON, f"{path}: byte {error.start}: expected a JSON list of LLaVA records in UTF-8, found "
            f"bytes that are not UTF-8 ({error.reason})"
        ) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise SampleError(
            CORRUPT_JSON, f"{path}: line {error.lineno}: expected a JSON list of LLaVA records, found invalid "
            f"JSON ({error.msg})"
        ) from None
    except (ValueError, RecursionError) as error:  # a number of over 4300 digits; nesting deeper than Python's stack
        raise SampleError(
            CORRUPT_JSON, f"{path}: expected a JSON list of LLaVA records, found JSON Python cannot read "
            f"({type(error).__name__}: {_short(str(error))})"
        ) from None
    if not isinstance(records, list):
        raise SampleError(MALFORMED, f"{path}: expected a JSON list of LLaVA records, found {_describe(records)}")
    located = ((f"{path}: record {index}", f"{path.name}:{index}", record) for index, record in enumerate(records))
    return samples_from_records(located, _root(path, image_root), policy)


def load_jsonl(
    path: str | Path, image_root: str | Path | None = None, policy: Policy = "error"
) -> tuple[list[Sample], SkipReport]:
    """One JSON record a line: caption pairs `{"image", "caption"}` (or LLaVA records). Blank lines are ignored."""
    check_policy(policy)
    path = Path(path)
    report = SkipReport()
    root = _root(path, image_root)

    def records() -> Iterator[tuple[str, str, Any]]:
        # Bytes, decoded a line at a time: one line that is not UTF-8 is that line's fault, not the file's.
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                where = f"{path}: line {number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    report.handle(SampleError(
                        CORRUPT_JSON, f"{where}: byte {error.start}: expected UTF-8 text, found bytes that are not "
                        f"UTF-8 ({error.reason})"
                    ), policy)
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    report.handle(SampleError(
                        CORRUPT_JSON, f"{where}: expected one JSON object, found invalid JSON ({error.msg})"
                    ), policy)
                    continue
                except (ValueError, RecursionError) as error:  # huge numbers, very deep nesting
                    report.handle(SampleError(
                        CORRUPT_JSON, f"{where}: expected one JSON object, found JSON Python cannot read "
                        f"({type(error).__name__}: {_short(str(error))})"
                    ), policy)
                    continue
                yield where, f"{path.name}:{number}", record

    return samples_from_records(records(), root, policy, report)


def load_parquet(
    files: str | Path, image_root: str | Path | None = None, policy: Policy = "error"
) -> tuple[list[Sample], SkipReport]:
    """Parquet file(s), a path or a glob, as `datasets` writes them (LLaVA- or caption-style columns).

    Read with pyarrow directly: `datasets.load_dataset("parquet")` would first copy everything into its cache.
    """
    import pyarrow.parquet as pq  # lazily: heavy, parquet files only

    check_policy(policy)
    paths = sorted(glob.glob(str(files))) if glob.has_magic(str(files)) else [str(files)]
    if not paths:
        raise FileNotFoundError(f"expected parquet files matching {files}, found none")
    root = _root(Path(paths[0]), image_root)

    def records() -> Iterator[tuple[str, str, Any]]:
        for file in paths:
            index = 0
            for batch in pq.ParquetFile(file).iter_batches():
                for row in batch.to_pylist():
                    yield f"{file}: row {index}", f"{Path(file).name}:{index}", row
                    index += 1

    return samples_from_records(records(), root, policy)


def load_hf_dataset(
    dataset: Any, image_root: str | Path | None = None, policy: Policy = "error"
) -> tuple[list[Sample], SkipReport]:
    """A `datasets.Dataset`, or a folder written by its `save_to_disk`.

    Rows are read as arrow data, so an `Image` column gives its stored {"bytes", "path"} and nothing is decoded.
    """
    import datasets  # lazily: 0.9 s, saved datasets only

    check_policy(policy)
    where, folder = "dataset", Path.cwd()
    if not isinstance(dataset, datasets.Dataset):
        where, folder = str(dataset), Path(dataset)
        loaded = datasets.load_from_disk(str(dataset))
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(
                f"expected one dataset at {dataset}, found a DatasetDict with splits {list(loaded)}; pass the "
                f"split's folder, e.g. {Path(dataset) / next(iter(loaded))}"
            )
        dataset = loaded
    root = Path(image_root) if image_root is not None else folder

    def records() -> Iterator[tuple[str, str, Any]]:
        index = 0
        for table in dataset.with_format("arrow").iter(batch_size=1000):
            for row in table.to_pylist():
                yield f"{where}: row {index}", f"row {index}", row
                index += 1

    return samples_from_records(records(), root, policy)


# ------------------------------------------------------------------------------------------ records -> Sample
def samples_from_records(
    records: Iterable[tuple[str, str, Any]], image_root: Path, policy: Policy = "error",
    report: SkipReport | None = None,
) -> tuple[list[Sample], SkipReport]:
    """`records`: (where, default id, record), `where` naming the file and line / index for error messages and
    the default id standing in for a record without an "id"."""
    report = report if report is not None else SkipReport()
    samples = []
    for where, default_id, record in records:
        try:
            samples.append(record_to_sample(record, where, image_root, default_id))
        except SampleError as error:
            report.handle(error, policy)
    return samples, report


def record_to_sample(record: Any, where: str, image_root: Path, default_id: str | None = None) -> Sample:
    """One LLaVA or caption record as a `Sample`; raises `SampleError` when it is unusable."""
    if not isinstance(record, dict):
        raise SampleError(MALFORMED, f"{where}: expected a JSON object, found {_describe(record)}")
    sample_id = default_id
    if record.get("id") is not None:
        if not isinstance(record["id"], str | int | float) or isinstance(record["id"], bool):
            raise SampleError(MALFORMED, f"{where}: expected 'id' to be a string or a number, found "
                                         f"{_describe(record['id'])}")
        try:
            sample_id = str(record["id"])
        except ValueError:  # a whole number of over 4300 digits has no str
            raise SampleError(MALFORMED, f"{where}: expected 'id' to be a string or a number, found a number "
                                         "too long to print") from None
        where = f"{where} (id {_short(repr(sample_id), 120)})"
    images = _images(_first_present(record, _IMAGE_KEYS), image_root, where)
    if "conversations" in record:
        messages = _conversation(record["conversations"], where)
    elif _first_present(record, _CAPTION_KEYS) is not None:
        caption = _first_present(record, _CAPTION_KEYS)
        if not isinstance(caption, str):
            raise SampleError(MALFORMED, f"{where}: expected the caption to be a string, found {_describe(caption)}")
        check_text(caption, f"{where}: caption")
        if not images:
            raise SampleError(MALFORMED, f"{where}: expected an image with the caption, found none")
        # Sample.caption's layout, for any number of images
        messages = [{"role": "user", "content": IMAGE_PLACEHOLDER * len(images)},
                    {"role": "assistant", "content": caption}]
    else:
        raise SampleError(
            MALFORMED, f"{where}: expected 'conversations' (LLaVA) or 'caption'/'text' (caption pairs), found keys "
            f"{_describe(sorted(map(str, record)))}"
        )
    messages = _place_images(messages, len(images), where)
    return Sample(messages=messages, images=images, id=sample_id)


def _conversation(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise SampleError(
            MALFORMED, f"{where}: expected 'conversations' to be a non-empty list of {{'from', 'value'}} turns, "
            f"found {_describe(turns)}"
        )
    messages = []
    for number, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = _ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise SampleError(
                MALFORMED, f"{where}: turn {number}: expected {{'from': one of {sorted(_ROLES)}, 'value': str}}, "
                f"found {_describe(turn)}"
            )
        check_text(turn["value"], f"{where}: turn {number}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _place_images(messages: list[dict[str, str]], num_images: int, where: str) -> list[dict[str, str]]:
    """Check one placeholder per image; put them in front of the first user turn when the text has none."""
    found = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in messages)
    first_user = next((i for i, message in enumerate(messages) if message["role"] == "user"), None)
    if found == 0 and num_images and first_user is not None:
        # LLaVA's data loader does the same: such records exist in its mixtures.
        messages[first_user]["content"] = (IMAGE_PLACEHOLDER + "\n") * num_images + messages[first_user]["content"]
        found = num_images
    if found != num_images:
        raise SampleError(
            PLACEHOLDER_MISMATCH, f"{where}: expected one {IMAGE_PLACEHOLDER!r} placeholder per image "
            f"({num_images} image(s)), found {found} placeholder(s)"
        )
    return messages


def _images(value: Any, root: Path, where: str) -> list[Image.Image | str | bytes]:
    """A record's image field as a list of PIL images, encoded bytes or existing file paths."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [_image(item, root, where) for item in values]


def _image(value: Any, root: Path, where: str) -> Image.Image | str | bytes:
    if isinstance(value, Image.Image | bytes):
        return value
    if isinstance(value, dict):  # a datasets Image feature as stored: {"bytes": ..., "path": ...}
        if isinstance(value.get("bytes"), bytes | bytearray | memoryview):
            return bytes(value["bytes"])
        if value.get("bytes") is not None:
            raise SampleError(MALFORMED, f"{where}: expected the image's 'bytes' to be bytes, found "
                                         f"{_describe(value['bytes'])}")
        value = value.get("path")
    if isinstance(value, str | Path) and str(value):
        path = Path(value) if Path(value).is_absolute() else root / value
        try:
            found = path.is_file()
        except OSError as error:  # a name too long for the file system, say: is_file lets that through
            raise SampleError(MISSING_IMAGE, f"{where}: expected image file {_short(str(path))}, found a path the "
                                             f"file system refuses ({error.strerror})") from None
        if not found:
            raise SampleError(MISSING_IMAGE, f"{where}: expected image file {_short(str(path))}, found nothing there")
        return str(path)
    raise SampleError(
        MALFORMED, f"{where}: expected an image path, bytes or PIL image, found {_describe(value)}"
    )


def open_image(image: Image.Image | str | Path | bytes) -> Image.Image:
    """A sample's image as an RGB PIL image: `kopru.image_processing.load_image` (fully decoded, so a truncated
    file fails here and not later; EXIF orientation, the pixel limit and transparency handled)."""
    return load_image(image)


def _root(data_file: Path, image_root: str | Path | None) -> Path:
    return Path(image_root) if image_root is not None else data_file.parent


def _first_present(record: dict, keys: tuple[str, ...]) -> Any:
    return next((record[key] for key in keys if record.get(key) is not None), None)


def lone_surrogate(text: str) -> str | None:
    """What keeps `text` from UTF-8 ("a lone surrogate '\\ud800' at character 3"; JSON's "\\ud800" escape gives
    one, and tokenizers fail on it with a TypeError that names nothing), or None when it encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"a lone surrogate {text[error.start]!r} at character {error.start}"
    return None


def check_text(text: str, where: str) -> None:
    """Refuse text without a UTF-8 form (`lone_surrogate`) before a tokenizer sees it."""
    if (problem := lone_surrogate(text)) is not None:
        raise SampleError(UNENCODABLE_TEXT, f"{where}: expected text encodable as UTF-8, found {problem}")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _describe(value: Any, limit: int = 80) -> str:
    """Type and a bounded repr: records can be huge or deeply nested, and their repr must not fail."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int of over 4300 digits has no repr
        text = "(too large to show)"
    return f"{type(value).__name__} {_short(text, limit)}"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = [
    "IMAGE_PLACEHOLDER", "SKIP_REASONS", "Policy", "SampleError", "SkipReport", "check_text", "load_hf_dataset",
    "load_jsonl",
    "load_llava_json", "load_parquet", "load_samples", "open_image", "record_to_sample", "samples_from_records",
]

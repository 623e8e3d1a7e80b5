"""Class names: folder name -> class name (`class_name`), class name -> a key safe in MLflow
metric, file and DVC plot names (`class_key`), and the collisions the folder source refuses."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable

#: The longest key `class_key` returns (MLflow metric keys may have 250 characters).
MAX_KEY_LENGTH = 64
_HASH_LENGTH = 10
#: Names kept as they are: ASCII letters, digits, `_ - .`, not starting with `.` or `-`.
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
#: A safe name that looks like a hashed key is hashed too, so it cannot equal another name's key.
_LOOKS_HASHED = re.compile(rf".*-[0-9a-f]{{{_HASH_LENGTH}}}")


def printable(text: str) -> str:
    """`text` with the lone surrogates of `os.fsdecode` (non-UTF-8 file names) as `\\xNN`."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def class_name(folder_name: str) -> str:
    """The class name of a folder: NFC-normalised (macOS writes NFD), trimmed (unless that leaves
    nothing), non-UTF-8 bytes as backslash escapes."""
    folder_name = printable(folder_name)
    return unicodedata.normalize("NFC", folder_name).strip() or folder_name


def _clashes(names: Iterable[str], key: Callable[[str], str]) -> list[list[str]]:
    groups: dict[str, set[str]] = defaultdict(set)
    for name in names:
        groups[key(name)].add(name)
    return [sorted(group) for _, group in sorted(groups.items()) if len(group) > 1]


def name_collisions(folder_names: Iterable[str]) -> list[str]:
    """One sentence per group of folder names that become the same class name."""
    return [
        f"class folders {', '.join(map(repr, names))} all become the class {class_name(names[0])!r}"
        for names in _clashes(folder_names, class_name)
    ]


def case_collisions(classes: Iterable[str]) -> list[str]:
    """One sentence per group of class names that differ only in case (`Car`, `car`)."""
    return [
        f"classes {', '.join(map(repr, names))} differ only in case"
        for names in _clashes(classes, str.casefold)
    ]


def class_key(name: str) -> str:
    """A distinct key for class `name`, at most `MAX_KEY_LENGTH` characters: `name` when short and
    only ASCII letters, digits and `_ - .`; else a readable prefix, `-` and 10 hex digits of its
    SHA-256 (`red car` -> `red_car-3f...`)."""
    if len(name) <= MAX_KEY_LENGTH and _SAFE.fullmatch(name) and not _LOOKS_HASHED.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]
    prefix = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).lstrip(".-")
    prefix = prefix[: MAX_KEY_LENGTH - _HASH_LENGTH - 1] or "class"
    return f"{prefix}-{digest}"

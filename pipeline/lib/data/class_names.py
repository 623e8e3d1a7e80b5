"""Class names: folder name -> class name (`class_name`), class name -> a key safe in MLflow
metric, file and DVC plot names (`class_key`), and the collisions the folder source refuses.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable

#: The longest key `class_key` returns (MLflow metric keys may have 250 characters).
MAX_KEY_LENGTH = 64
_HASH_LENGTH = 10
#: Names kept as they are: ASCII letters, digits, `_ - .`, not starting with `.` or `-`.
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
#: A safe name that looks like a hashed key is hashed too, so it cannot equal another name's key.
_LOOKS_HASHED = re.compile(rf".*-[0-9a-f]{{{_HASH_LENGTH}}}")


def has_surrogates(text: str) -> bool:
    """True when `text` holds lone surrogates (`os.fsdecode` of a file name that is not UTF-8)."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def class_name(folder_name: str) -> str:
    """The class name of a folder: NFC-normalised (macOS writes NFD), trimmed (unless that leaves
    nothing), non-UTF-8 bytes as backslash escapes."""
    if has_surrogates(folder_name):
        folder_name = os.fsencode(folder_name).decode("utf-8", "backslashreplace")
    return unicodedata.normalize("NFC", folder_name).strip() or folder_name


def name_collisions(folder_names: Iterable[str]) -> list[str]:
    """One sentence per group of folder names that become the same class name."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in folder_names:
        groups[class_name(name)].append(name)
    return [
        f"class folders {', '.join(repr(n) for n in sorted(names))} all become the class {label!r}"
        for label, names in sorted(groups.items())
        if len(names) > 1
    ]


def case_collisions(classes: Iterable[str]) -> list[str]:
    """One sentence per group of class names that differ only in case (`Car`, `car`)."""
    groups: dict[str, set[str]] = defaultdict(set)
    for label in classes:
        groups[label.casefold()].add(label)
    return [
        f"classes {', '.join(repr(n) for n in sorted(names))} differ only in case"
        for _, names in sorted(groups.items())
        if len(names) > 1
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

"""Split GGUFs (`name-00001-of-00003.gguf`, llama.cpp's gguf-split layout) made whole again.

The first part holds the metadata, every part holds some tensors. The merged file keeps the
first part's metadata minus the `split.*` keys and lists the tensors in part order, so the
vault stores one model that any GGUF reader opens.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from freehold.errors import InvalidInput

SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<n>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Written by GGUFWriter itself (architecture) or meaningless in one file (split.*, GGUF.*).
_SKIP = ("GGUF.", "split.", "general.architecture", "general.alignment")


def split_sets(names: list[str]) -> dict[str, list[str]]:
    """First part's name → all part names in order, for each complete split set in `names`."""
    groups: dict[tuple[str, int], dict[int, str]] = {}
    for name in names:
        if m := SPLIT_RE.match(name):
            groups.setdefault((m["stem"], int(m["count"])), {})[int(m["n"])] = name
    sets = {}
    for (stem, count), parts in groups.items():
        if sorted(parts) != list(range(1, count + 1)):
            raise InvalidInput(
                f"{stem} is split into {count} parts but only parts {sorted(parts)} exist"
            )
        ordered = [parts[n] for n in range(1, count + 1)]
        sets[ordered[0]] = ordered
    return sets


def _copy_fields(first: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for key, field in first.fields.items():
        if key.startswith(_SKIP):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def merge_split(parts: list[Path], out: Path) -> Path:
    """Write the parts of one split GGUF as a single GGUF at `out`."""
    readers = [gguf.GGUFReader(p) for p in parts]
    first = readers[0]
    declared = first.get_field(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    if declared is not None and int(declared.contents()) != len(parts):
        raise InvalidInput(
            f"{parts[0].name} says it has {declared.contents()} parts, not {len(parts)}"
        )
    arch = first.get_field("general.architecture")
    writer = gguf.GGUFWriter(str(out), str(arch.contents()) if arch else "unknown")
    if (align := first.get_field("general.alignment")) is not None:
        writer.add_custom_alignment(int(align.contents()))
    _copy_fields(first, writer)
    tensors = [t for r in readers for t in r.tensors]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return out

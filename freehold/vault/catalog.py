"""The vault's catalog: SQLite, opened and migrated by `freehold.db` (`PRAGMA user_version`).

One row per model (name:tag → digest, GGUF facts, provenance, lineage, license), the
files kept with it (license texts, notices, templates) and aliases. All changes for one
import happen in one transaction, so a model is either fully catalogued or absent.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freehold.db import open_db
from freehold.errors import AmbiguousName, InvalidInput, NotFound

DEFAULT_TAG = "latest"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

MIGRATIONS: list[str] = [
    # 1: models, the files kept with them, aliases.
    """
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        tag TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        format TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'model',
        architecture TEXT,
        parameters INTEGER,
        quantization TEXT,
        bits_per_weight REAL,
        context_length INTEGER,
        layers INTEGER,
        embedding_length INTEGER,
        vocab_size INTEGER,
        has_chat_template INTEGER NOT NULL DEFAULT 0,
        metadata TEXT NOT NULL DEFAULT '{}',
        source_kind TEXT NOT NULL,
        source_location TEXT NOT NULL,
        original_filename TEXT,
        upstream_revision TEXT,
        imported_at TEXT NOT NULL,
        parent_digest TEXT,
        derivation TEXT,
        license_id TEXT NOT NULL,
        UNIQUE (name, tag)
    );
    CREATE INDEX models_digest ON models (digest);
    CREATE TABLE model_files (
        model_id INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        filename TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (model_id, filename)
    );
    CREATE TABLE aliases (
        name TEXT NOT NULL,
        tag TEXT NOT NULL,
        model_id INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
        PRIMARY KEY (name, tag)
    );
    """,
]


def parse_ref(ref: str) -> tuple[str, str]:
    """'name[:tag]' → (name, tag), checked; names are lower-case like Ollama's."""
    name, _, tag = ref.strip().partition(":")
    tag = tag or DEFAULT_TAG
    if not _NAME_RE.match(name) or not _TAG_RE.match(tag):
        raise InvalidInput(
            f"'{ref}' is not a valid model name: use NAME[:TAG] with lower-case letters, digits, "
            "'.', '_', '-' or '/' in NAME (e.g. smollm2:135m)"
        )
    return name, tag


@dataclass
class ModelFile:
    role: str  # license | notice | template | params | system | readme
    filename: str
    digest: str
    size: int


@dataclass
class ModelRecord:
    name: str
    tag: str
    digest: str
    size: int
    format: str
    kind: str
    architecture: str | None
    parameters: int | None
    quantization: str | None
    bits_per_weight: float | None
    context_length: int | None
    layers: int | None
    embedding_length: int | None
    vocab_size: int | None
    has_chat_template: bool
    metadata: dict[str, Any]
    source_kind: str
    source_location: str
    original_filename: str | None
    upstream_revision: str | None
    imported_at: str
    parent_digest: str | None
    derivation: dict[str, Any] | None
    license_id: str
    files: list[ModelFile] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    id: int | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("id")
        d["ref"] = self.ref
        return d


_COLUMNS = [
    "name",
    "tag",
    "digest",
    "size",
    "format",
    "kind",
    "architecture",
    "parameters",
    "quantization",
    "bits_per_weight",
    "context_length",
    "layers",
    "embedding_length",
    "vocab_size",
    "has_chat_template",
    "metadata",
    "source_kind",
    "source_location",
    "original_filename",
    "upstream_revision",
    "imported_at",
    "parent_digest",
    "derivation",
    "license_id",
]


class Catalog:
    def __init__(self, path: Path) -> None:
        # A long wait for the write lock: imports by concurrent `freehold add` runs queue here.
        self.db = open_db(path, MIGRATIONS, busy_timeout_s=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reading ---------------------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> ModelRecord:
        d = dict(row)
        model_id = d.pop("id")
        d["has_chat_template"] = bool(d["has_chat_template"])
        d["metadata"] = json.loads(d["metadata"])
        d["derivation"] = json.loads(d["derivation"]) if d["derivation"] else None
        files = [
            ModelFile(r["role"], r["filename"], r["digest"], r["size"])
            for r in self.db.execute(
                "SELECT * FROM model_files WHERE model_id = ? ORDER BY filename", (model_id,)
            )
        ]
        aliases = [
            f"{r['name']}:{r['tag']}"
            for r in self.db.execute(
                "SELECT name, tag FROM aliases WHERE model_id = ? ORDER BY name, tag", (model_id,)
            )
        ]
        return ModelRecord(**d, files=files, aliases=aliases, id=model_id)

    def all(self) -> list[ModelRecord]:
        rows = self.db.execute("SELECT * FROM models ORDER BY name, tag").fetchall()
        return [self._record(r) for r in rows]

    def find(self, ref: str) -> ModelRecord | None:
        """A model by name[:tag], alias, or a unique name when no tag is given."""
        name, tag = parse_ref(ref)
        row = (
            self.db.execute(
                "SELECT * FROM models WHERE name = ? AND tag = ?", (name, tag)
            ).fetchone()
            or self.db.execute(
                "SELECT m.* FROM aliases a JOIN models m ON m.id = a.model_id "
                "WHERE a.name = ? AND a.tag = ?",
                (name, tag),
            ).fetchone()
        )
        if row is None and ":" not in ref:
            rows = self.db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return self._record(row) if row else None

    def get(self, ref: str) -> ModelRecord:
        record = self.find(ref)
        if record is None and ":" not in ref:
            name, _ = parse_ref(ref)
            refs = [
                f"{name}:{r['tag']}"
                for r in self.db.execute(
                    "SELECT tag FROM models WHERE name = ? ORDER BY tag", (name,)
                )
            ]
            if len(refs) > 1:
                raise AmbiguousName(
                    f"'{ref}' names {len(refs)} models in the vault: {', '.join(refs)}; "
                    f"give the tag, e.g. `{refs[0]}`"
                )
        if record is None:
            raise NotFound(
                f"no model named '{ref}' in the vault: see `freehold list`, or add it with "
                "`freehold add SOURCE --name NAME:TAG`"
            )
        return record

    def is_alias(self, ref: str) -> bool:
        name, tag = parse_ref(ref)
        q = "SELECT 1 FROM aliases WHERE name = ? AND tag = ?"
        return self.db.execute(q, (name, tag)).fetchone() is not None

    def referenced_digests(self) -> set[str]:
        rows = self.db.execute("SELECT digest FROM models UNION SELECT digest FROM model_files")
        return {r[0] for r in rows}

    # -- writing (callers wrap these in `transaction()`) -----------------------------------

    def name_taken(self, name: str, tag: str) -> bool:
        q = (
            "SELECT 1 FROM models WHERE name = ? AND tag = ? "
            "UNION SELECT 1 FROM aliases WHERE name = ? AND tag = ?"
        )
        return self.db.execute(q, (name, tag, name, tag)).fetchone() is not None

    def insert(self, record: ModelRecord) -> int:
        values = asdict(record)
        values["metadata"] = json.dumps(record.metadata, sort_keys=True)
        values["derivation"] = json.dumps(record.derivation) if record.derivation else None
        values["has_chat_template"] = int(record.has_chat_template)
        cur = self.db.execute(
            f"INSERT INTO models ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            [values[c] for c in _COLUMNS],
        )
        model_id = int(cur.lastrowid or 0)
        for f in record.files:
            self.db.execute(
                "INSERT INTO model_files (model_id, role, filename, digest, size) "
                "VALUES (?, ?, ?, ?, ?)",
                (model_id, f.role, f.filename, f.digest, f.size),
            )
        for alias in record.aliases:
            self.add_alias(alias, model_id)
        return model_id

    def add_alias(self, alias: str, model_id: int) -> None:
        name, tag = parse_ref(alias)
        if self.name_taken(name, tag):
            raise InvalidInput(f"'{name}:{tag}' already names a model: pick another alias")
        self.db.execute(
            "INSERT INTO aliases (name, tag, model_id) VALUES (?, ?, ?)", (name, tag, model_id)
        )

    def remove_alias(self, ref: str) -> None:
        name, tag = parse_ref(ref)
        self.db.execute("DELETE FROM aliases WHERE name = ? AND tag = ?", (name, tag))

    def delete(self, model_id: int) -> None:
        self.db.execute("DELETE FROM models WHERE id = ?", (model_id,))

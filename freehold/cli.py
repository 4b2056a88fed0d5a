"""The `freehold` command: parse arguments, call the library, print results. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from freehold.errors import FreeholdError

app = typer.Typer(
    help="Freehold: own your AI. Keep verified open weights, serve them, adapt and measure them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


# ---- keep: the vault ------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _print_json(data: object) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _model_json(vault, record) -> dict:  # noqa: ANN001 - vault types imported lazily
    d = record.to_dict()
    d["license_profile"] = vault.license(record).to_dict()
    return d


@app.command()
def add(
    source: str = typer.Argument(
        ..., help="A .gguf path, pkg:DIST, ollama:NAME[:TAG] or hf:ORG/REPO[@REV]."
    ),
    name: str = typer.Option(None, "--name", "-n", help="NAME[:TAG] to catalog it under."),
    alias: list[str] = typer.Option([], "--alias", help="Further names for the same model."),
    file: str = typer.Option(None, "--file", help="Which GGUF, when the source holds several."),
    link: bool = typer.Option(False, "--link", help="Hard-link instead of copying (same disk)."),
    if_missing: bool = typer.Option(False, "--if-missing", help="Do nothing if NAME exists."),
) -> None:
    """Import open weights into the vault, verified and catalogued with their license."""
    from freehold.progress import byte_progress
    from freehold.vault import Vault
    from freehold.vault.importers import plan_import

    with Vault() as vault:
        if if_missing and name and vault.catalog.find(name):
            console.print(f"{name} is already in the vault")
            return
        plan = plan_import(source, file)
        with byte_progress() as progress:
            result = vault.add(plan, name, link=link, progress=progress, aliases=tuple(alias))
        r = result.record
        if not result.new_model:
            console.print(f"{r.ref} already holds these weights ({r.digest[:19]}…)")
            return
        stored = "stored" if result.new_blob else "already stored; catalogued only"
        console.print(
            f"[green]added[/] {r.ref}  {r.architecture} {_params(r.parameters)} "
            f"{r.quantization}  {_human(r.size)} ({stored})  license: "
            f"{vault.license(r).name}"
        )


@app.command("list")
def list_models(json_out: bool = typer.Option(False, "--json", help="Machine-readable.")) -> None:
    """List the models in the vault."""
    from rich.table import Table

    from freehold.vault import Vault

    with Vault() as vault:
        records = vault.list()
        if json_out:
            _print_json([_model_json(vault, r) for r in records])
            return
        table = Table("NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "LICENSE", "COMMERCIAL")
        for r in records:
            p = vault.license(r)
            table.add_row(
                r.ref,
                r.architecture,
                _params(r.parameters),
                r.quantization,
                _human(r.size),
                p.spdx or p.name,
                p.commercial,
            )
        console.print(table if records else "The vault is empty: `freehold add SOURCE`.")


@app.command()
def show(
    model: str = typer.Argument(..., help="NAME[:TAG] or alias."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """Show a model's facts, provenance, lineage and license terms in plain words."""
    from freehold.vault import Vault

    with Vault() as vault:
        r = vault.get(model)
        if json_out:
            _print_json(_model_json(vault, r))
            return
        parents = [m.ref for m in vault.list() if m.digest == r.parent_digest]
        rows = [
            ("Model", r.ref + (f"  (aliases: {', '.join(r.aliases)})" if r.aliases else "")),
            ("Digest", r.digest),
            ("Size", f"{_human(r.size)} ({r.size} bytes), {r.format}, {r.kind}"),
            ("Architecture", f"{r.architecture}, {r.parameters:,} parameters"),
            ("Quantization", f"{r.quantization}, {r.bits_per_weight} bits per weight"),
            ("Shape", f"{r.layers} layers, embedding {r.embedding_length}, vocab {r.vocab_size}"),
            ("Context", str(r.context_length)),
            ("Chat template", "yes" if r.has_chat_template else "no (completions only)"),
            ("Source", f"{r.source_kind}: {r.source_location}"),
            ("Original file", str(r.original_filename)),
            ("Upstream revision", str(r.upstream_revision or "unknown")),
            ("Imported", r.imported_at),
        ]
        if r.parent_digest:
            parent = ", ".join(parents) or "not in this vault"
            rows.append(("Derived from", f"{r.parent_digest} ({parent})"))
            rows.append(("Derivation", str(r.derivation)))
        for f in r.files:
            rows.append((f"Kept {f.role}", f"{f.filename} ({f.digest[:19]}…)"))
        for key, value in rows:
            console.print(f"[bold]{key:>18}[/]  {value}", highlight=False)
        console.print()
        for line in vault.license(r).plain_words():
            console.print(f"  {line}", highlight=False)


@app.command()
def rm(
    model: str = typer.Argument(..., help="NAME[:TAG]; an alias removes only the alias."),
) -> None:
    """Remove a model from the vault and free the blobs nothing else uses."""
    from freehold.vault import Vault

    with Vault() as vault:
        record, freed = vault.remove(model)
        console.print(f"removed {model} ({record.ref}); freed {_human(freed)}")


@app.command()
def alias(
    new: str = typer.Argument(..., help="The new NAME[:TAG]."),
    model: str = typer.Argument(..., help="The existing model."),
) -> None:
    """Give a model another name."""
    from freehold.vault import Vault

    with Vault() as vault:
        r = vault.alias(new, model)
        console.print(f"{new} → {r.ref}")


@app.command()
def verify(model: str = typer.Argument(None, help="One model; default: all.")) -> None:
    """Re-hash stored blobs; exit non-zero naming each corrupt or missing one."""
    from freehold.progress import byte_progress
    from freehold.vault import Vault

    with Vault() as vault, byte_progress() as progress:
        problems = vault.verify(model, progress)
        count = 1 if model else len(vault.list())
    for p in problems:
        err_console.print(
            f"[bold red]{p.status}:[/] {p.model} {p.what} {p.digest}", highlight=False
        )
    if problems:
        err_console.print(f"{len(problems)} problem(s): re-add or re-import the models named.")
        raise typer.Exit(3)
    console.print(f"[green]ok[/]: {count} model(s) verified")


@app.command()
def gc() -> None:
    """Delete blobs no model uses, and files left by interrupted imports."""
    from freehold.vault import Vault

    with Vault() as vault:
        count, freed = vault.gc()
    console.print(f"removed {count} unused blob(s); freed {_human(freed)}")


@app.command()
def export(
    models: list[str] = typer.Argument(..., help="Models to bundle."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle file (.tar) to write."),
    sign: Path = typer.Option(None, "--sign", help="ed25519 private key from `keygen`."),
) -> None:
    """Write a portable, verifiable bundle of models with their licenses."""
    from freehold.progress import byte_progress
    from freehold.vault import Vault
    from freehold.vault.bundles import export as export_bundle

    with Vault() as vault, byte_progress() as progress:
        manifest = export_bundle(vault, models, output, sign, progress)
    signed = " (signed)" if sign else ""
    console.print(f"wrote {output}{signed}: {len(manifest['models'])} model(s)")


@app.command("import")
def import_(
    bundle: Path = typer.Argument(..., help="A bundle from `freehold export`."),
    trust: list[Path] = typer.Option([], "--trust", help="Public key(s) the bundle must match."),
) -> None:
    """Import a bundle: every digest (and signature, with --trust) checks, or nothing is added."""
    from freehold.progress import byte_progress
    from freehold.vault import Vault
    from freehold.vault.bundles import import_bundle

    with Vault() as vault, byte_progress() as progress:
        result = import_bundle(vault, bundle, trust, progress)
    for r in result.added:
        console.print(f"[green]imported[/] {r.ref} {r.digest[:19]}…")
    for ref in result.skipped:
        console.print(f"{ref} already present with the same weights")
    if result.signed_by:
        console.print(f"signature verified with {result.signed_by}")


@app.command()
def keygen(
    output: Path = typer.Option(Path("freehold"), "-o", "--output", help="PREFIX for the files."),
) -> None:
    """Make an ed25519 key pair for signing bundles: PREFIX.key and PREFIX.pub."""
    from freehold.vault.bundles import keygen as make_keys

    private, public = make_keys(output)
    console.print(f"private key: {private} (keep it secret)\npublic key:  {public}")


# ---- run: the engine ------------------------------------------------------------------------


# ---- serve ----------------------------------------------------------------------------------


# ---- measure --------------------------------------------------------------------------------


# ---- adapt ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="freehold")
    except FreeholdError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)

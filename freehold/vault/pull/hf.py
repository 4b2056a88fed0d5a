"""`pull hf:ORG/REPO[@REV]`: one GGUF (or a whole safetensors model) from a Hugging Face hub.

The revision is resolved to a commit sha first and every file is fetched at that commit, so
what is listed is what is downloaded. Each file is checked against the hub's own checksum
(the LFS sha256, or git's blob id for small files) while it is written; the model enters
the vault only when all of it checks. `huggingface_hub` supplies the endpoint (HF_ENDPOINT),
the token (HF_TOKEN or a saved login) and the repo listing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx

from freehold.errors import FreeholdError, IntegrityError, InvalidInput, NotFound
from freehold.vault.importers import (
    LICENSE_NAME_RE,
    ImportPlan,
    SourceFile,
    card_license,
    license_files_in,
)
from freehold.vault.pull.download import (
    HttpStatus,
    Remote,
    download,
    transport_errors,
)
from freehold.vault.pull.known import held_under, stored_copy
from freehold.vault.pull.options import PullOptions, Reporter, announce
from freehold.vault.pull.split import SPLIT_RE, merge_split, split_sets
from freehold.vault.pull.staging import staging
from freehold.vault.store import AddResult, Provenance, Vault

# Files of a safetensors model folder worth fetching (with the license files): weights,
# configs, tokenizer, chat template, model card.
FOLDER_FILE_RE = re.compile(
    r"(\.safetensors|\.json|\.model|\.tiktoken|\.txt|\.jinja)$|^tokenizer|^README\.md$"
)


def _hub() -> ModuleType:
    """huggingface_hub, imported after telemetry is switched off (it reads env at import)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.errors
    import huggingface_hub.utils

    return huggingface_hub


def parse_spec(spec: str) -> tuple[str, str]:
    repo, _, rev = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InvalidInput(f"hf:{spec} is not hf:ORG/REPO[@REVISION]")
    return repo, rev or "main"


# -- choosing the GGUF -------------------------------------------------------------------


def gguf_candidates(names: list[str]) -> dict[str, list[str]]:
    """Each GGUF the repo holds (a split set under its first part) → its files in order."""
    sets = split_sets(names)
    in_sets = {p for parts in sets.values() for p in parts}
    found = {n: [n] for n in names if n.endswith(".gguf") and n not in in_sets}
    found.update(sets)
    return dict(sorted(found.items()))


def _listing(candidates: dict[str, list[str]]) -> str:
    return ", ".join(
        k if len(v) == 1 else f"{k} (+{len(v) - 1} parts)" for k, v in candidates.items()
    )


def quant_matches(candidates: dict[str, list[str]], quant: str) -> list[str]:
    """Names carrying `quant` as a whole tag: Q4_K matches x.Q4_K.gguf, not x.Q4_K_M.gguf."""
    tag = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9]|_[A-Za-z0-9])", re.I)
    return [k for k in candidates if tag.search(k)]


def choose(candidates: dict[str, list[str]], opts: PullOptions, where: str) -> str:
    if opts.file:
        for key, parts in candidates.items():
            if opts.file in (key, *parts):
                return key
        raise NotFound(f"{where} has no GGUF named {opts.file}: it has {_listing(candidates)}")
    if opts.quant:
        found = quant_matches(candidates, opts.quant)
        if len(found) == 1:
            return found[0]
        if not found:
            raise NotFound(
                f"{where} has no GGUF tagged {opts.quant}: it has {_listing(candidates)}; "
                "pass --quant TAG or --file NAME"
            )
        candidates = {k: candidates[k] for k in found}
    if len(candidates) == 1:
        return next(iter(candidates))
    raise InvalidInput(
        f"{where} holds several GGUF files: {_listing(candidates)}; choose one with "
        "--quant TAG or --file NAME"
    )


# -- talking to the hub --------------------------------------------------------------------


def _gated(repo: str, endpoint: str, hub: ModuleType) -> FreeholdError:
    page = f"{endpoint}/{repo}"
    if hub.get_token():
        why = "the token in HF_TOKEN (or your saved login) has no access to it yet"
    else:
        why = "no token was given"
    return FreeholdError(
        f"{repo} is gated and {why}: accept its terms at {page} while logged in, then set "
        "HF_TOKEN to an access token of that account and run `freehold pull` again"
    )


def model_info(hub: ModuleType, repo: str, rev: str, endpoint: str) -> Any:
    """The repo listing at `rev`, with each file's size and checksum; errors in plain words."""
    if hub.constants.HF_HUB_OFFLINE:
        raise InvalidInput(
            "HF_HUB_OFFLINE is set and `pull` needs the network: unset it, or take a model "
            "already in the local cache with `freehold add hf:ORG/REPO`"
        )
    errors = hub.errors
    try:
        return hub.HfApi(endpoint=endpoint).model_info(repo, revision=rev, files_metadata=True)
    except errors.GatedRepoError:
        raise _gated(repo, endpoint, hub) from None
    except errors.RevisionNotFoundError:
        raise NotFound(
            f"{repo} has no revision '{rev}' on {endpoint}: give a branch, tag or commit "
            "that exists (hf:ORG/REPO@main)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise NotFound(
            f"there is no model repo {repo} on {endpoint}: check the name (a private repo "
            "also needs HF_TOKEN)"
        ) from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise FreeholdError(f"{endpoint} refused the listing of {repo} (HTTP {status})") from None
    except transport_errors() as e:
        raise FreeholdError(
            f"cannot reach {endpoint} ({type(e).__name__}: {e}): check the network or "
            "HF_ENDPOINT, then run `freehold pull` again"
        ) from None


def _checksum(sibling: Any) -> str:
    if sibling.lfs:
        return "sha256:" + sibling.lfs.sha256
    if sibling.blob_id:
        return "gitsha1:" + sibling.blob_id
    raise IntegrityError(f"the hub lists no checksum for {sibling.rfilename}: cannot verify it")


class _Hub:
    """Downloads of one repo at one commit, with the hub's errors turned into sentences."""

    def __init__(
        self, hub: ModuleType, endpoint: str, repo: str, info: Any, reporter: Reporter
    ) -> None:
        self.hub, self.endpoint, self.repo, self.info = hub, endpoint, repo, info
        self.commit: str = info.sha
        self.files = {s.rfilename: s for s in info.siblings or []}
        self.reporter = reporter
        headers = hub.utils.build_hf_headers()
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(30.0, read=120.0))

    def close(self) -> None:
        self.client.close()

    def fetch(self, name: str, dest: Path) -> Path:
        s = self.files[name]
        url = self.hub.hf_hub_url(self.repo, name, revision=self.commit, endpoint=self.endpoint)
        host = urlsplit(self.endpoint).netloc
        remote = Remote(url, _checksum(s), s.size, f"{name} from {host}")
        try:
            return download(self.client, remote, dest, self.reporter.progress)
        except HttpStatus as e:
            if e.status in (401, 403):
                raise _gated(self.repo, self.endpoint, self.hub) from None
            if e.status == 404:
                raise NotFound(
                    f"{self.repo} has no file {name} at commit {self.commit[:12]}: "
                    "run `freehold pull` again to list what it has"
                ) from None
            raise FreeholdError(f"{self.endpoint} refused {name} (HTTP {e.status})") from None

    def fetch_terms(self, folder: Path) -> tuple[list[SourceFile], list[str]]:
        """LICENSE/NOTICE files and the model card at the repo's top: (extras, card license)."""
        wanted = [
            n for n in self.files if "/" not in n and (LICENSE_NAME_RE.match(n) or n == "README.md")
        ]
        for n in wanted:
            self.fetch(n, folder / n)
        extras = license_files_in(folder) if wanted else []
        card = folder / "README.md"
        if card.is_file():
            extras.append(SourceFile("readme", "README.md", [card]))
        return extras, card_license(folder)


# -- the pull ------------------------------------------------------------------------------


def pull_hf(vault: Vault, spec: str, opts: PullOptions, reporter: Reporter) -> AddResult:
    repo, rev = parse_spec(spec)
    hub = _hub()
    endpoint = hub.constants.ENDPOINT
    announce(reporter.say, endpoint)
    info = model_info(hub, repo, rev, endpoint)
    where = f"hf:{repo}@{rev}"
    names = [s.rfilename for s in info.siblings or []]
    candidates = gguf_candidates(names)
    conn = _Hub(hub, endpoint, repo, info, reporter)
    try:
        if not candidates:
            if any(n.endswith(".safetensors") for n in names):
                return _pull_folder(vault, conn, opts)
            raise NotFound(f"{where} holds no GGUF or safetensors files: it has {', '.join(names)}")
        if opts.outtype or opts.to:
            raise InvalidInput(
                f"{where} holds GGUF files: --outtype and --to are for safetensors repos; "
                "pull the GGUF, then `freehold quantize` it"
            )
        chosen = choose(candidates, opts, where)
        reporter.say(f"{repo} at commit {conn.commit}: {chosen}")
        return _pull_gguf(vault, conn, chosen, candidates[chosen], opts)
    finally:
        conn.close()


def _pull_gguf(
    vault: Vault, conn: _Hub, chosen: str, parts: list[str], opts: PullOptions
) -> AddResult:
    single = _checksum(conn.files[chosen]) if len(parts) == 1 else None
    if done := held_under(vault, opts.name, single):
        return done
    with staging(vault.home, f"hf:{conn.repo}", "hf", conn.repo, conn.commit, chosen) as folder:
        if have := stored_copy(vault, single):
            conn.reporter.say(f"{chosen}: the vault already stores these bytes, not fetching")
            paths = [have]
        else:
            paths = [conn.fetch(n, folder / "parts" / Path(n).name) for n in parts]
        extras, card_ids = conn.fetch_terms(folder / "files")
        if single:
            filename, weights, expected = Path(chosen).name, paths[0], single
        else:
            filename = SPLIT_RE.sub(r"\g<stem>.gguf", Path(parts[0]).name)
            weights = merge_split(paths, folder / filename)
            expected = None  # the parts were verified; the merged file is new
        plan = ImportPlan(
            "hf",
            f"hf:{conn.repo}",
            SourceFile("weights", filename, [weights], expected, verified=expected is not None),
            extras=extras,
            upstream_revision=conn.commit,
            license_ids=card_ids,
        )
        return vault.add(plan, opts.name, link=True, progress=conn.reporter.progress)


def _pull_folder(vault: Vault, conn: _Hub, opts: PullOptions) -> AddResult:
    """A repo of safetensors: fetch the model folder, convert it, keep the originals."""
    names = [
        n
        for n in conn.files
        if "/" not in n and (FOLDER_FILE_RE.search(n) or LICENSE_NAME_RE.match(n))
    ]
    from freehold.adapt.convert import add_hf_folder
    from freehold.adapt.converter import check_outtype
    from freehold.adapt.quantizer import check_type

    outtype = check_outtype(opts.outtype or "f16")  # bad flags fail before any download
    if opts.to:
        check_type(opts.to)
    conn.reporter.say(f"{conn.repo} at commit {conn.commit}: safetensors, converting to GGUF")
    with staging(vault.home, f"hf:{conn.repo}", "hf-folder", conn.repo, conn.commit) as folder:
        model_dir = folder / conn.repo.split("/")[1]  # its name names the models
        for n in names:
            conn.fetch(n, model_dir / n)
        origin = Provenance("hf", f"hf:{conn.repo}", None, conn.commit)
        return add_hf_folder(
            vault,
            model_dir,
            opts.name,
            outtype=outtype,
            to=opts.to,
            origin=origin,
            progress=conn.reporter.progress,
            link=True,  # staged on the vault's filesystem: linked in, not copied again
            say=conn.reporter.say,
        )

"""Pull: the one command that reaches beyond this machine, and says where before it does.

`hf:ORG/REPO[@REV]` fetches from a Hugging Face hub (`hf.py`), `ollama:NAME[:TAG]` from an
Ollama registry (`ollama.py`). Both download resumably, verify every byte against the digest
the source publishes while writing it (`download.py`), and hand the verified files to the
vault, which links them in (no second copy) with their license and provenance.
"""

from __future__ import annotations

from freehold.errors import InvalidInput
from freehold.vault.pull.options import PullOptions, Reporter
from freehold.vault.store import AddResult, Vault

__all__ = ["PullOptions", "Reporter", "pull"]


def pull(vault: Vault, source: str, opts: PullOptions, reporter: Reporter) -> AddResult:
    """Fetch `source` into `vault`; nothing enters the catalog unless all of it verifies."""
    scheme, sep, rest = source.partition(":")
    if sep and scheme == "hf":
        from freehold.vault.pull.hf import pull_hf

        return pull_hf(vault, rest, opts, reporter)
    if sep and scheme == "ollama":
        from freehold.vault.pull.ollama import pull_ollama

        return pull_ollama(vault, rest, opts, reporter)
    raise InvalidInput(
        f"'{source}' is not something to pull: write hf:ORG/REPO[@REVISION] or "
        "ollama:NAME[:TAG] (for a local file or cache, use `freehold add`)"
    )

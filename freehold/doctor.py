"""`freehold doctor`: what this machine and its llama.cpp build can run on, and what a running
server actually offloads.

The facts come from llama.cpp itself (engine/devices.py) and from the machine (measure/
hardware.py); a server is asked over HTTP (its /devices route), so `--url` works for a server
on another machine too. The CLI only prints the lines built here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from freehold.engine import devices
from freehold.engine.model import available_ram_bytes, physical_cores
from freehold.errors import FreeholdError

GIB = 1 << 30


@dataclass(frozen=True)
class DoctorReport:
    backend: devices.Backend
    llama_cpp_python: str
    cpu: str
    logical_cpus: int
    physical_cores: int  # the engine's default thread count
    ram_total_bytes: int
    ram_available_bytes: int
    nvidia_smi: list[str]  # GPUs the driver lists, whatever llama.cpp was built for
    server_url: str | None = None
    server: dict[str, Any] | None = None  # the server's /devices answer

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["backend"]["gpus"] = [asdict(g) for g in self.backend.gpus]
        d["advice"] = advice(self)
        return d


def local_report() -> DoctorReport:
    """This machine and the llama.cpp build Freehold runs on."""
    import llama_cpp

    from freehold.measure import hardware

    machine = hardware.detect()
    return DoctorReport(
        backend=devices.detect(),
        llama_cpp_python=llama_cpp.__version__,
        cpu=machine.cpu,
        logical_cpus=machine.cores,
        physical_cores=physical_cores(),
        ram_total_bytes=int(machine.ram_gib * GIB),
        ram_available_bytes=available_ram_bytes(),
        nvidia_smi=machine.gpus,
    )


def server_devices(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """A running Freehold server's backend, devices and per-model offload (GET /devices)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = url.rstrip("/").removesuffix("/v1") + "/devices"
    try:
        r = httpx.get(target, headers=headers, timeout=timeout, trust_env=False)
    except httpx.HTTPError as e:
        raise FreeholdError(
            f"could not reach {url} ({e.__class__.__name__}): is `freehold serve` running there?"
        ) from None
    if r.status_code == 401:
        raise FreeholdError(f"{url} needs an API key: pass --api-key or set FREEHOLD_API_KEY")
    if r.status_code == 404:
        raise FreeholdError(f"{url} has no /devices route: is it a Freehold server?")
    if r.status_code != 200:
        raise FreeholdError(f"{target} answered HTTP {r.status_code}: {r.text[:200]}")
    return r.json()


def advice(r: DoctorReport) -> str | None:
    """The one thing to do, when the build and the hardware disagree."""
    if r.nvidia_smi and not r.backend.gpu_offload:
        return (
            f"nvidia-smi lists {len(r.nvidia_smi)} GPU(s) but this llama.cpp build is CPU-only: "
            "rebuild it with `FREEHOLD_BACKEND=cuda make setup` (docs/gpu.md)"
        )
    if r.backend.gpu_offload and not r.backend.gpus:
        return f"this is a {r.backend.name} build but it finds no GPU: check the driver"
    return None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _device_line(d: devices.Device) -> str:
    return (
        f"{d.name} ({d.kind}) {d.description}: {_gib(d.free_bytes)} free of {_gib(d.total_bytes)}"
    )


def _server_lines(url: str, s: dict[str, Any]) -> list[tuple[str, str]]:
    offload = "GPU offload available" if s.get("gpu_offload") else "no GPU offload"
    lines = [("Server", f"{url}: backend {s.get('backend')}, {offload}")]
    for model, m in (s.get("models") or {}).items():
        lines.append((f"  {model}", f"{m.get('state')}; {m.get('summary', 'not loaded')}"))
    for name, u in (s.get("upstreams") or {}).items():  # `serve --upstream`
        why = f"; {u['last_error']}" if u.get("last_error") else ""
        text = f"{u.get('state')} {u.get('url')} ({u.get('model')}), {u.get('in_flight')} in flight"
        lines.append((f"  upstream {name}", text + why))
    return lines


def report_lines(r: DoctorReport) -> list[tuple[str, str]]:
    """(label, text) rows, as the CLI prints them."""
    b = r.backend
    lines = [
        (
            "Backend",
            f"{b.name} (llama.cpp from llama-cpp-python {r.llama_cpp_python}; GPU offload: "
            f"{'yes' if b.gpu_offload else 'no'})",
        ),
        ("Build", b.system_info or "-"),
    ]
    lines += [("Device", _device_line(d)) for d in b.devices]
    lines += [
        (
            "CPU",
            f"{r.cpu}: {r.logical_cpus} threads, {r.physical_cores} physical cores "
            "(the engine's default --threads)",
        ),
        ("RAM", f"{_gib(r.ram_total_bytes)} total, {_gib(r.ram_available_bytes)} available"),
        ("nvidia-smi", ", ".join(r.nvidia_smi) or "no NVIDIA GPU listed"),
    ]
    tip = advice(r)
    if tip:
        lines.append(("Advice", tip))
    if r.server is not None and r.server_url:
        lines += _server_lines(r.server_url, r.server)
    return lines

"""GPU offload plumbing, on this CPU-only llama.cpp build: `--gpu-layers auto` runs on the CPU
and says so, an explicit layer count is refused, `doctor` reports the build and the machine, a
server says what it offloads. The planner and the unload decisions, which need GPU memory to
decide anything, are tested with made-up devices (the only fakes here: there is no GPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_harness import free_port, running_server, wait_ready

from freehold.engine import devices
from freehold.engine.devices import Backend, Device, ModelShape, Workload, plan_offload
from freehold.engine.residency import InsufficientMemory, Resident, Room, choose_unloads
from freehold.errors import InvalidInput

GIB, MIB = 1 << 30, 1 << 20
CPU_ONLY = "GPU offload: none (CPU build of llama.cpp)"


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _refusal(err: str, asked: int) -> None:
    """One line, naming what was asked, why it cannot be done, and both ways out."""
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    assert f"--gpu-layers {asked}" in err and "no GPU backend" in err
    assert "FREEHOLD_BACKEND=cuda" in err and "--gpu-layers 0" in err


# ---- the real build (CPU) -------------------------------------------------------------------


def test_this_build_is_cpu_only() -> None:
    backend = devices.detect()
    assert backend.name == "cpu" and not backend.gpu_offload and not backend.gpus
    assert [d.kind for d in backend.devices] == ["cpu"]
    assert backend.devices[0].total_bytes > 0 and "AVX" in backend.system_info


def test_run_auto_runs_on_the_cpu_and_says_so(smollm2_path: Path, cli) -> None:
    args = ["run", smollm2_path, "What is 2+2?", "--temperature", "0", "--max-tokens", "8"]
    r = cli(*args, "--threads", "1", "--ctx", "256", "--gpu-layers", "auto", "--json")
    assert r.code == 0, r.err
    assert CPU_ONLY in r.err and r.json()["usage"]["completion_tokens"] > 0
    # auto is the default, and the engine loaded its weights with no layer on a GPU.
    from freehold.engine.session import open_engine

    with open_engine(str(smollm2_path), n_ctx=256, n_threads=1) as engine:
        assert engine.offload.gpu_layers == 0 and engine.model.gpu_layers == 0
        assert engine.offload.summary == CPU_ONLY and not engine.offload.active
        assert engine.offload.n_layer == engine.model.n_layer == 30


def test_gpu_layers_zero_is_cpu_by_request(smollm2_path: Path, cli) -> None:
    r = cli("run", smollm2_path, "Hi", "--max-tokens", "2", "--ctx", "256", "--gpu-layers", "0")
    assert r.code == 0, r.err
    assert "GPU offload: off (--gpu-layers 0)" in r.err
    # Unasked, a CPU-only build has nothing to report: stderr stays as it was.
    quiet = cli("run", smollm2_path, "Hi", "--max-tokens", "2", "--ctx", "256")
    assert quiet.code == 0 and "GPU offload" not in quiet.err


def test_explicit_layers_on_a_cpu_build_are_refused(smollm2_path: Path, cli) -> None:
    r = cli("run", smollm2_path, "Hi", "--max-tokens", "2", "--gpu-layers", "10")
    assert r.code == 2 and r.out == ""
    _refusal(r.err, 10)
    chat = cli("chat", smollm2_path, "--gpu-layers", "3", input="Hi\n/exit\n")
    assert chat.code == 2 and chat.out == ""
    _refusal(chat.err, 3)


def test_every_engine_command_refuses_explicit_layers(smollm2_path: Path, home: Path, cli) -> None:
    bench = cli("bench", smollm2_path, "--repeats", "1", "--gpu-layers", "10")
    assert bench.code == 2
    _refusal(bench.err, 10)
    quality = cli("eval", smollm2_path, "--max-chunks", "1", "--gpu-layers", "10")
    assert quality.code == 2
    _refusal(quality.err, 10)
    serve = cli("serve", "--model", smollm2_path, "--port", free_port(), "--gpu-layers", "10")
    assert serve.code == 2
    _refusal(serve.err, 10)
    # quantize refuses before it quantizes: nothing new lands in the vault.
    assert cli("add", smollm2_path, "--name", "smol", "--link").code == 0
    q = cli("quantize", "smol", "--to", "Q8_0", "--allow-requantize", "--gpu-layers", "10")
    assert q.code == 2
    _refusal(q.err, 10)
    assert [m["ref"] for m in cli("list", "--json").json()] == ["smol:latest"]
    # --url benchmarks a server, which offloads as it was started.
    url = cli("bench", "--url", "http://127.0.0.1:9", "--gpu-layers", "auto")
    assert url.code == 2 and "freehold serve --gpu-layers" in url.err


@pytest.mark.parametrize("value", ["lots", "-1", "1.5", ""])
def test_bad_gpu_layers_values(smollm2_path: Path, cli, value: str) -> None:
    r = cli("run", smollm2_path, "Hi", "--gpu-layers", value)
    assert r.code == 2 and r.out == ""
    assert "--gpu-layers takes auto, 0" in r.err and repr(value) in r.err


def test_doctor_prints_the_cpu_backend_and_the_machine(cli) -> None:
    r = cli("doctor")
    assert r.code == 0, r.err
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in r.out.splitlines()}
    assert lines["Backend"].startswith("cpu (llama.cpp from llama-cpp-python 0.3.36")
    assert "GPU offload: no" in lines["Backend"]
    assert lines["RAM"].startswith(f"{_meminfo_total() / GIB:.1f} GiB total")
    assert f"{os.cpu_count()} threads" in lines["CPU"]
    data = cli("doctor", "--json").json()
    assert data["backend"]["name"] == "cpu" and data["backend"]["gpu_offload"] is False
    assert data["backend"]["gpus"] == [] and data["ram_total_bytes"] == pytest.approx(
        _meminfo_total(), rel=1e-6
    )
    assert 0 < data["ram_available_bytes"] <= data["ram_total_bytes"]


def test_doctor_url_that_answers_nothing_is_one_clear_line(cli) -> None:
    r = cli("doctor", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.code == 1 and "could not reach" in r.err and "freehold serve" in r.err


def test_served_models_report_offload_off(tmp_path: Path, smollm2_path: Path, cli) -> None:
    with running_server(tmp_path / "home", {"smol": smollm2_path}, slots=1, ctx=256) as s:
        data = httpx.get(s.base + "/devices", timeout=10).json()
        assert data["backend"] == "cpu" and data["gpu_offload"] is False
        smol = data["models"]["smol"]
        assert smol["state"] == "loaded" and smol["active"] is False
        assert smol["gpu_layers"] == 0 and smol["layers"] == 30
        assert smol["summary"] == CPU_ONLY
        r = cli("doctor", "--url", s.base)
        assert r.code == 0, r.err
        assert "backend cpu, no GPU offload" in r.out
        assert f"loaded; {CPU_ONLY}" in r.out


def test_serve_says_what_it_offloads(tmp_path: Path, smollm2_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PROXY")}
    env["FREEHOLD_HOME"] = str(tmp_path / "home")
    cmd = [sys.executable, "-m", "freehold", "serve", "--model", str(smollm2_path),
           "--port", str(port), "--slots", "1", "--ctx", "256", "--threads", "1",
           "--gpu-layers", "auto"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        deadline, seen = time.monotonic() + 60, ""
        assert proc.stdout is not None
        while "Freehold is serving" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert f"{smollm2_path.stem}: {CPU_ONLY}" in seen
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_model_shape_from_the_gguf_header(smollm2_path: Path) -> None:
    from freehold.engine import Model

    shape = devices.model_shape(smollm2_path)
    m = Model(smollm2_path)
    try:
        assert shape.n_layer == m.n_layer == 30 and shape.n_embd == m.n_embd
        assert shape.n_vocab == m.n_vocab and shape.n_ctx_train == m.n_ctx_train
        # The KV cache the planner reserves is the engine's own figure (f16 K and V).
        assert shape.kv_bytes(range(30), 1, "f16") == m.kv_bytes_per_token()
        # Tied embeddings: the output layer's copy of token_embd is what a full offload puts on
        # the GPU besides the blocks (the input embeddings stay on the CPU), so the offloadable
        # bytes are exactly the weights llama.cpp counts.
        assert sum(shape.layer_bytes) + shape.output_bytes == m.info().size_bytes
    finally:
        m.close()


# ---- the planner, with made-up devices ------------------------------------------------------

# 10 layers of 100 MiB, a 50 MiB output layer; 1 MiB of KV per layer for the workload below.
SHAPE = ModelShape(
    n_layer=10,
    layer_bytes=(100 * MIB,) * 10,
    output_bytes=50 * MIB,
    kv_values_per_token=(256,) * 10,
    n_ctx_train=4096,
    n_vocab=32000,
    n_embd=1024,
)
WORK = Workload(slots=1, ctx_per_slot=2048)  # 256 values x 2048 tokens x 2 bytes = 1 MiB/layer


def _gpu(free: int, name: str = "NVIDIA H200", n: int = 1) -> Backend:
    gpus = tuple(Device(f"CUDA{i}", name, "gpu", free // n, 141 * GIB) for i in range(n))
    return Backend("cuda", True, (Device("CPU", "Xeon", "cpu", 64 * GIB, 64 * GIB), *gpus))


def _free_for(layers: int, work: Workload = WORK) -> int:
    """Free memory that holds exactly `layers` (llama.cpp's count) and the reserve."""
    return devices.offload_bytes(SHAPE, layers, work) + devices.RESERVE_MIN_BYTES


def test_plan_everything_fits() -> None:
    plan = plan_offload("auto", SHAPE, _gpu(80 * GIB), WORK)
    assert plan.gpu_layers == 11 and plan.offloaded_layers == 10 and plan.active
    assert plan.summary.startswith("GPU offload: 10/10 layers on NVIDIA H200 (about ")
    assert plan.device == "NVIDIA H200" and plan.device_bytes == devices.offload_bytes(
        SHAPE, 11, WORK
    )


def test_plan_some_layers_fit() -> None:
    plan = plan_offload("auto", SHAPE, _gpu(_free_for(4) + 10 * MIB), WORK)
    assert plan.gpu_layers == 4 and plan.offloaded_layers == 4
    assert "4/10 layers" in plan.summary and "the rest do not fit" in plan.summary
    assert "1 slot x 2048 tokens" in plan.summary


def test_plan_no_layer_fits() -> None:
    plan = plan_offload("auto", SHAPE, _gpu(_free_for(1) - 1), WORK)
    assert plan.gpu_layers == 0 and not plan.active and plan.device is None
    assert plan.summary.startswith("GPU offload: none (not one layer fits in ")


def test_plan_reserves_the_kv_cache_for_slots_and_context() -> None:
    backend = _gpu(_free_for(11))  # everything fits with one short slot...
    assert plan_offload("auto", SHAPE, backend, WORK).gpu_layers == 11
    # ...but 8 slots of 8192 tokens take 32 MiB of KV per layer: fewer layers fit beside them.
    big = Workload(slots=8, ctx_per_slot=8192)
    plan = plan_offload("auto", SHAPE, backend, big)
    assert 0 < plan.gpu_layers < 10
    assert devices.offload_bytes(SHAPE, plan.gpu_layers, big) <= devices.usable_bytes(backend)
    assert devices.offload_bytes(SHAPE, plan.gpu_layers + 1, big) > devices.usable_bytes(backend)
    assert "8 slots x 8192 tokens" in plan.summary
    # A q8_0 cache is about half the size: more layers fit.
    q8 = plan_offload("auto", SHAPE, backend, Workload(8, 8192, "q8_0"))
    assert q8.gpu_layers > plan.gpu_layers


def test_plan_sums_free_memory_over_gpus() -> None:
    plan = plan_offload("auto", SHAPE, _gpu(80 * GIB, n=2), WORK)
    assert plan.gpu_layers == 11 and "on 2 GPUs (NVIDIA H200, NVIDIA H200)" in plan.summary


def test_plan_explicit_counts() -> None:
    backend = _gpu(80 * GIB)
    assert plan_offload(0, SHAPE, backend, WORK).summary == "GPU offload: off (--gpu-layers 0)"
    three = plan_offload(3, SHAPE, backend, WORK)
    assert three.gpu_layers == 3 and "3/10 layers" in three.summary
    assert plan_offload(99, SHAPE, backend, WORK).gpu_layers == 11  # clamped: all, output too
    tight = plan_offload(10, SHAPE, _gpu(_free_for(2)), WORK)  # asked for: tried, with a warning
    assert tight.gpu_layers == 10 and "may not fit" in tight.summary


def test_explicit_layers_need_a_gpu_build_and_a_gpu() -> None:
    cpu = Backend("cpu", False, (Device("CPU", "Xeon", "cpu", GIB, GIB),))
    assert plan_offload("auto", SHAPE, cpu, WORK).summary == CPU_ONLY
    with pytest.raises(InvalidInput, match="no GPU backend"):
        plan_offload(5, SHAPE, cpu, WORK)
    no_gpu = Backend("cuda", True, cpu.devices)
    assert plan_offload("auto", SHAPE, no_gpu, WORK).summary == (
        "GPU offload: none (no GPU found by cuda)"
    )
    with pytest.raises(InvalidInput, match="finds no GPU"):
        plan_offload(5, SHAPE, no_gpu, WORK)


def test_workload_follows_the_engine_defaults() -> None:
    assert devices.workload(SHAPE, None, None) == Workload(8, 4096)
    assert devices.workload(SHAPE, 2, 1000, "q8_0", 256) == Workload(2, 1024, "q8_0", 256)


# ---- unload decisions, with made-up models --------------------------------------------------


def _r(ref: str, host: int, device: int = 0, idle: float = 0.0, busy: bool = False) -> Resident:
    return Resident(ref, host * MIB, device * MIB, idle, busy)


def test_unloads_on_cpu_are_by_host_memory_alone() -> None:
    loaded = [_r("a", 400, idle=1), _r("b", 400, idle=2)]
    assert choose_unloads(loaded, Room("c", 100 * MIB, 1000 * MIB)) == []
    assert choose_unloads(loaded, Room("c", 300 * MIB, 1000 * MIB)) == ["a"]  # LRU first
    with pytest.raises(InsufficientMemory, match="busy, retry later"):
        choose_unloads([_r("a", 900, busy=True)], Room("c", 300 * MIB, 1000 * MIB))


def test_unloads_free_gpu_memory_from_idle_models() -> None:
    loaded = [_r("cpu-only", 100, idle=0), _r("old", 100, 600, idle=1), _r("new", 100, 300, idle=2)]
    room = Room("c", 100 * MIB, 10 * GIB, device_bytes=500 * MIB, device_budget=1000 * MIB)
    # 900 MiB held + 500 wanted > 1000: the least recently used model holding GPU memory goes
    # (not the older CPU-only one, which frees nothing there).
    assert choose_unloads(loaded, room) == ["old"]


def test_gpu_pressure_never_fails_a_load() -> None:
    busy = [_r("busy", 100, 900, busy=True)]
    room = Room("c", 100 * MIB, 10 * GIB, device_bytes=500 * MIB, device_budget=1000 * MIB)
    assert choose_unloads(busy, room) == []  # it loads with the layers that fit


def test_host_unloads_count_towards_gpu_room() -> None:
    loaded = [_r("a", 800, 600, idle=1), _r("b", 100, 300, idle=2)]
    room = Room("c", 300 * MIB, 1000 * MIB, device_bytes=500 * MIB, device_budget=1000 * MIB)
    assert choose_unloads(loaded, room) == ["a"]  # host room frees the GPU room too

"""GPUs, with the stand-in NVML (tests/nvml-standin.c) and the stand-in
llama-server reporting its VRAM to it: placement on the device with room,
LRU stops on one device, a CPU-only model beside full GPUs, budgets never
passed while the sampler reads the stand-in's numbers, and a device that
disappears."""
import os
import subprocess

import pytest

from conftest import BUILD, LLAMA_POOL, REAL, wait_for
from test_proxy import CHAT, post

pytestmark = pytest.mark.skipif(REAL, reason="the stand-in NVML needs the stand-in llama-server")

STANDIN = os.path.join(BUILD, "libnvml-standin.so")
GIB = 1 << 30


def gpu_pool(pool, models, devices="Stand-in GPU:8192;Stand-in GPU:8192", extra=""):
    vram_dir = os.path.join(pool.dir, "vram")
    os.makedirs(vram_dir, exist_ok=True)
    for m in models.values():
        m.setdefault("env", {})["NVML_STANDIN_DIR"] = vram_dir
    pool.config(models, pool_extra=f"nvml_library = {STANDIN}\ngpu_reserve = 0\n{extra}")
    lost = os.path.join(pool.dir, "lost")
    open(lost, "w").close()
    # The stand-in NVML (in the daemon) and the children both use the dir.
    pool.start(env={"NVML_STANDIN_DEVICES": devices, "NVML_STANDIN_LOST": lost,
                    "NVML_STANDIN_DIR": vram_dir})
    return lost


def gpu_model(gib, **more):
    """A model charged GIB GiB of VRAM (gpu_memory) whose stand-in reports
    using 90% of that."""
    return {"gpu_memory": f"{gib}G", "instances": "0-1",
            "env": {"FAKE_VRAM_MB": str(int(gib * 1024 * 0.9))}, **more}


def chat(pool, model, timeout=10):
    """(status, body text) of a chat request for MODEL through the pool."""
    code, _, body = post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": model},
                         timeout=timeout)
    return code, body.decode(errors="replace")


def child_env(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def placed(pool, name):
    insts = pool.ready_instances(name)
    assert len(insts) == 1, insts
    return insts[0]


def devices(pool):
    return pool.status()["devices"]


def test_instances_go_to_the_device_with_room_and_lru_makes_room_on_one(pool):
    gpu_pool(pool, {"a": gpu_model(5), "b": gpu_model(5), "c": gpu_model(5)})
    devs = devices(pool)
    assert [d["budget"] for d in devs] == [8 * GIB, 8 * GIB]
    assert chat(pool, "a")[0] == 200
    assert chat(pool, "b")[0] == 200          # a's device has 3 GiB left: the other
    a, b = placed(pool, "a"), placed(pool, "b")
    assert {a["device"], b["device"]} == {0, 1}
    # Each child sees only its own GPU, and llama-server's --fit is off.
    for inst in (a, b):
        env = child_env(inst["pid"])
        assert env[b"CUDA_VISIBLE_DEVICES"].decode() == devs[inst["device"]]["uuid"]
        assert env[b"LLAMA_ARG_FIT"] == b"off"
    # c fits nowhere: a (least recently used) is stopped, c takes its device.
    assert chat(pool, "b")[0] == 200          # b is the more recent
    assert chat(pool, "c", timeout=30)[0] == 200
    c = placed(pool, "c")
    assert c["device"] == a["device"]
    assert pool.ready_instances("a") == []
    assert placed(pool, "b")["pid"] == b["pid"]
    assert "least recently used, room needed" in pool.daemon_log()
    st = devices(pool)
    assert all(d["used"] <= d["budget"] for d in st)
    # The sampler reads what the stand-in says the children use (90% of 5 GiB).
    want = int(5 * 1024 * 0.9) << 20
    wait_for(lambda: [d["measured"] for d in devices(pool)] == [want, want],
             timeout=10, what=f"measured VRAM from the stand-in NVML ({want} each)")


def test_a_cpu_only_model_runs_beside_full_gpus(pool):
    gpu_pool(pool, {"g": gpu_model(7), "cpu": {"args": "-c 256 -np 2 -ngl 0"}},
             devices="Stand-in GPU:8192")
    assert chat(pool, "g")[0] == 200
    assert chat(pool, "cpu")[0] == 200        # the GPU is full: no matter
    cpu = placed(pool, "cpu")
    assert cpu["device"] is None
    assert child_env(cpu["pid"])[b"CUDA_VISIBLE_DEVICES"] == b"-1"
    assert pool.model("cpu")["vram_estimate"] == 0
    assert placed(pool, "g")["device"] == 0


def test_a_model_larger_than_every_device_is_refused_with_the_numbers(pool):
    gpu_pool(pool, {"huge": gpu_model(20)})
    code, body = chat(pool, "huge")
    assert code == 503, body
    assert "needs 20 GiB of GPU memory; the largest device budget is 8.0 GiB" in body


def test_budgets_hold_while_many_models_come_and_go(pool):
    models = {f"m{i}": gpu_model(2 + i % 3) for i in range(6)}
    gpu_pool(pool, models)
    for rnd in range(3):
        for name in models:
            assert chat(pool, name, timeout=30)[0] == 200
            for d in devices(pool):
                assert d["used"] <= d["budget"], d
                assert d["measured"] <= d["budget"], d


def test_a_device_that_disappears_leaves_the_other(pool):
    lost = gpu_pool(pool, {"a": gpu_model(5), "b": gpu_model(5)})
    assert chat(pool, "a")[0] == 200
    with open(lost, "w") as f:
        f.write(f"{1 - placed(pool, 'a')['device']}\n")   # the device a is not on
    wait_for(lambda: any(d["lost"] for d in devices(pool)), timeout=10, what="a device lost")
    assert "lost" in pool.daemon_log().lower()
    gone = [d for d in devices(pool) if d["lost"]][0]
    assert gone["budget"] == 0
    # b would have gone to the lost device: now it waits for a's room instead.
    assert chat(pool, "b", timeout=30)[0] == 200
    assert placed(pool, "b")["device"] != gone["index"]


def test_status_check_and_metrics_show_each_gpu(pool):
    gpu_pool(pool, {"a": gpu_model(5), "cpu": {"args": "-c 256 -np 2 -ngl 0"}})
    assert chat(pool, "a")[0] == 200
    a = placed(pool, "a")
    st = pool.status()
    assert pool.model("a")["vram_estimate"] == 5 * GIB
    assert a["vram"] == int(5 * 1024 * 0.9) << 20 or a["vram"] == 0   # sampled every 2 s
    out = pool.cli("status", check=0).stdout
    assert f"GPU 0 Stand-in GPU: {'5.0 GiB' if a['device'] == 0 else '0 B'} charged of 8.0 GiB budget" in out, out
    assert "GPU 1 Stand-in GPU:" in out
    wait_for(lambda: placed(pool, "a")["vram"] > 0, timeout=10, what="a's VRAM sampled")
    code, body = pool.get("/metrics")
    text = body.decode()
    assert f'llama_pool_gpu_budget_bytes{{device="0",name="Stand-in GPU"}} {8 * GIB}' in text
    assert f'llama_pool_gpu_used_bytes{{device="{a["device"]}",name="Stand-in GPU"}} {5 * GIB}' in text
    assert (f'llama_pool_instance_vram_bytes{{model="a",instance="a#1"}} '
            f'{int(5 * 1024 * 0.9) << 20}') in text
    # check, offline, with the daemon's GPUs: each model's estimate.
    r = subprocess.run([LLAMA_POOL, "check", "-c", pool.conf], capture_output=True, text=True,
                       env={**os.environ, "NVML_STANDIN_DEVICES": "Stand-in GPU:8192"})
    assert r.returncode == 0, r.stderr
    assert "GPU 0: Stand-in GPU, 8.0 GiB, budget 8.0 GiB" in r.stdout, r.stdout
    assert "VRAM 5.0 GiB (gpu_memory)" in r.stdout, r.stdout
    assert "no VRAM" in r.stdout.split("[cpu]")[1], r.stdout


def test_when_every_gpu_is_lost_models_run_on_host_memory(pool):
    lost = gpu_pool(pool, {"a": gpu_model(5)}, devices="Stand-in GPU:8192")
    with open(lost, "w") as f:
        f.write("0\n")
    wait_for(lambda: "every GPU is lost: host memory only" in pool.daemon_log(), timeout=10,
             what="the warning")
    assert chat(pool, "a", timeout=30)[0] == 200
    a = placed(pool, "a")
    assert a["device"] is None
    assert child_env(a["pid"])[b"CUDA_VISIBLE_DEVICES"] == b"-1"


def test_a_model_split_by_its_args_is_charged_on_each_device(pool):
    gpu_pool(pool, {"split": {"args": "-c 256 -np 2 --device CUDA0,CUDA1", "gpu_memory": "6G",
                              "env": {"FAKE_VRAM_MB": "3000"}},
                    "one": gpu_model(6)})
    assert chat(pool, "split")[0] == 200
    inst = placed(pool, "split")
    assert inst["device"] == [0, 1]
    assert b"CUDA_VISIBLE_DEVICES" not in child_env(inst["pid"])   # its args choose
    used = [d["used"] for d in devices(pool)]
    assert sum(used) == 6 * GIB and all(u > 0 for u in used), used
    # 6 GiB fits on neither device now (8 - 3 each): the split goes for it.
    assert chat(pool, "one", timeout=30)[0] == 200
    assert pool.ready_instances("split") == []
    assert all(d["used"] <= d["budget"] for d in devices(pool))

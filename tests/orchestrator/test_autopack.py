"""``--pack auto`` (issue: packed training): the pack size chosen from a calibration's throughput and
memory, the calibration itself (a real subprocess timing real packed training steps, here on the CPU),
its cache, and packs formed per shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.dispatch import autopack
from orchestrator.dispatch.packs import checked_pack, form_packs, pack_sizes
from orchestrator.dispatch.slots import Slot, device_slots
from orchestrator.dispatch.task import Task
from orchestrator.errors import UserError
from training.config import RunConfig, shape_of

GiB = 2**30


def rates(*rows):
    return [{"members": n, "images_per_second": ips, "peak_bytes": int(gib * GiB)} for n, ips, gib in rows]


MEASURED = rates((1, 4000, 0.3), (2, 7500, 0.5), (5, 16000, 1.0), (10, 24000, 2.0), (25, 26000, 5.0),
                 (50, 26500, 10.0))


def test_choose_takes_the_smallest_pack_within_5_percent_of_the_best_that_fits():
    assert autopack.choose(MEASURED, free_bytes=100 * GiB, jobs_per_gpu=1, cap=50) == 25  # 26000 >= 0.95 * 26500
    assert autopack.choose(MEASURED, free_bytes=10 * GiB, jobs_per_gpu=1, cap=50) == 25  # 50's 10 GiB > 80 % of 10
    assert autopack.choose(MEASURED, free_bytes=10 * GiB, jobs_per_gpu=2, cap=50) == 10  # 2 x 5 GiB > 8 GiB
    assert autopack.choose(MEASURED, free_bytes=100 * GiB, jobs_per_gpu=1, cap=7) == 5  # not more than runs per slot
    assert autopack.choose(MEASURED, free_bytes=None, jobs_per_gpu=1, cap=50) == 25  # memory unknown (the CPU)
    assert autopack.choose(MEASURED, free_bytes=GiB // 10, jobs_per_gpu=1, cap=50) == 1  # nothing fits: alone


def test_the_calibration_times_real_packed_steps_in_a_subprocess(tmp_path):
    out = autopack.measure(("resnet14", 10, 50, "fp32"), [1, 2], "cpu", None, steps=1, warmup=0)
    assert out["device"] == "cpu" and out["free_bytes"] is None and out["torch"].startswith("2.")
    assert [m["members"] for m in out["results"]] == [1, 2]
    assert all(m["images_per_second"] > 0 and m["peak_bytes"] == 0 for m in out["results"])
    with pytest.raises(RuntimeError, match=r"calibration failed \(exit 1\): ValueError: .*'densenet'"):
        autopack.measure(("densenet", 10, 50, "fp32"), [1], "cpu", None, steps=1, warmup=0)


def configs(arch: str, n: int) -> list[RunConfig]:
    return [RunConfig(arch=arch, seed=s, weight_decay=1e-4 * (1 + s)) for s in range(n)]


def gpu_slots(gpus: int, jobs: int) -> list[Slot]:
    return device_slots([str(g) for g in range(gpus)], jobs, None, cores=16)


def test_auto_measures_each_shape_once_caches_it_and_falls_back_when_it_cannot(tmp_path):
    calls = []

    def measure(shape, sizes, device, gpu):
        calls.append((shape, tuple(sizes), device, gpu))
        if shape[0] == "resnet110":
            raise RuntimeError("calibration failed (exit 1): CUDA error: out of memory")
        return {"device": "NVIDIA H200", "free_bytes": 140 * GiB, "torch": "2.14.1", "results": MEASURED}

    by_shape = {shape_of(c[0]): c for c in (configs("resnet14", 50), configs("resnet32", 8), configs("resnet110", 50))}
    sizes, notes = autopack.auto_sizes(by_shape, gpu_slots(1, 2), tmp_path, measure_fn=measure)
    r14, r32, r110 = by_shape
    assert sizes == {r14: 25, r32: 2, r110: autopack.FALLBACK}  # resnet32: 8 runs on 2 slots, 4 each at most
    assert calls == [(("resnet14", 10, 50, "fp32"), (1, 2, 5, 10, 25), "cuda", "0"),
                     (("resnet32", 10, 50, "fp32"), (1, 2), "cuda", "0"),
                     (("resnet110", 10, 50, "fp32"), (1, 2, 5, 10, 25), "cuda", "0")]
    assert notes[0].startswith("--pack auto: resnet14 x 10 classes, fp32: packs of 25 (images/s by pack size on "
                               "NVIDIA H200: 1: 4000, 2: 7500")
    assert "out of memory; packs of 10" in notes[2]
    cached = json.loads((tmp_path / autopack.CACHE).read_text())
    assert len(cached) == 2 and all(e["results"] == MEASURED for e in cached.values())

    calls.clear()  # the same sweep again: decided from the cache, only the failed shape is tried again
    again, _ = autopack.auto_sizes(by_shape, gpu_slots(1, 2), tmp_path, measure_fn=measure)
    assert again == sizes and [c[0][0] for c in calls] == ["resnet110"]
    calls.clear()  # more runs per slot than were measured: measured again, up to 50
    autopack.auto_sizes({r14: configs("resnet14", 50)}, gpu_slots(1, 1), tmp_path, measure_fn=measure)
    assert calls == [(("resnet14", 10, 50, "fp32"), (1, 2, 5, 10, 25, 50), "cuda", "0")]


def tasks(cfgs: list[RunConfig], root: Path) -> list[Task]:
    return [Task(f"k{i:02d}", c, root / f"k{i:02d}") for i, c in enumerate(cfgs)]


def test_pack_sizes_and_packs_per_shape_the_same_whatever_has_finished(tmp_path):
    todo = tasks(configs("resnet14", 7) + configs("resnet32", 3), tmp_path)
    everything = {t.key: t.config for t in todo}
    r14, r32 = shape_of(todo[0].config), shape_of(todo[-1].config)
    cpu = device_slots([], 1, 2, cores=2)
    assert pack_sizes("auto", list(everything.values()), cpu, tmp_path) == {r14: 1, r32: 1}  # the CPU: alone
    assert pack_sizes(5, list(everything.values()), cpu, tmp_path) == {r14: 5, r32: 5}
    assert pack_sizes("auto", list(everything.values()), gpu_slots(1, 1), tmp_path, calibrate=False) == \
        {r14: 10, r32: 10}
    jobs = form_packs(todo, {r14: 3, r32: 5}, tmp_path / "packs")
    assert [[r.key for r in j.runs] for j in jobs] == [["k00", "k01", "k02"], ["k03", "k04", "k05"], ["k06"],
                                                       ["k07", "k08", "k09"]]
    assert [j.pack_size for j in jobs] == [3, 3, 0, 3]
    # a re-run after k00, k01, k03-k05 and k09 finished: the same packs, less what is done, resumable first
    left = [todo[i] for i in (8, 2, 6, 7)]
    again = form_packs(left, {r14: 3, r32: 5}, tmp_path / "packs", everything)
    assert [(j.key, [r.key for r in j.runs], j.pack_size) for j in again] == \
        [(jobs[3].key, ["k07", "k08"], 3), (jobs[0].key, ["k02"], 3), ("k06", ["k06"], 0)]
    assert checked_pack("off") == 1 and checked_pack("auto") == "auto" and checked_pack("4") == 4
    with pytest.raises(UserError, match=r"^pack 0: expected a pack size >= 1, auto or off"):
        checked_pack(0)


STREAMS_FAST = rates((1, 4000, 0.3), (2, 8000, 0.4), (5, 19000, 1.0), (10, 30000, 1.5))
STREAMS_SLOW = rates((1, 4000, 0.3), (2, 6000, 0.4), (5, 9000, 1.0), (10, 12000, 1.5))


def cached_calibration(packs_dir: Path, shape: tuple, streams: list | None) -> None:
    """A calibration.json as ``--pack auto`` writes it, for GPU 0 and this torch, sizes 1 to 10 asked."""
    key = "|".join(map(str, ("gpu 0", f"torch {autopack._torch_version()}", *shape)))
    entry = {"device": "NVIDIA H200", "free_bytes": 140 * GiB, "torch": "2.11.0", "results": MEASURED[:4],
             "asked": [1, 2, 5, 10]}
    if streams is not None:
        entry["streams"] = streams
    packs_dir.mkdir(parents=True, exist_ok=True)
    (packs_dir / autopack.CACHE).write_text(json.dumps({key: entry}))


@pytest.mark.parametrize(("streams", "chosen"), [(STREAMS_FAST, (10, "streams")), (STREAMS_SLOW, (10, "fused")),
                                                 (None, (10, "fused"))],
                         ids=["streams-faster", "fused-faster", "cached-before-streams"])
def test_auto_trains_each_shape_the_way_its_calibration_measured_faster(tmp_path, streams, chosen):
    from orchestrator.dispatch.packs import pack_plan, write_job_spec
    from orchestrator.run.spec import PackSpec, WorkerSpec

    todo = tasks(configs("resnet14", 20), tmp_path / "runs")
    shape = shape_of(todo[0].config)
    packs_dir = tmp_path / "runs" / "packs"
    cached_calibration(packs_dir, ("resnet14", 10, 50, "fp32"), streams)
    notes = []
    plan = pack_plan("auto", [t.config for t in todo], gpu_slots(1, 1), packs_dir, note=notes.append)
    assert plan == {shape: chosen}  # from the cache: nothing measured (a real calibration needs CUDA)
    # fused 10 members: 24000 images/s; streams 10: 30000 (faster) or 12000 (slower)
    size, mode = chosen
    on = " on streams" if mode == "streams" else ""
    assert notes == [f"--pack auto: resnet14 x 10 classes, fp32: packs of 10{on}"
                     f" (images/s by pack size on NVIDIA H200: 1: 4000, 2: 7500, 5: 16000, 10: 24000"
                     + ("; on streams: " + ", ".join(f"{m['members']}: {m['images_per_second']}" for m in streams)
                        if streams else "") + ")"]
    jobs = form_packs(todo, {shape: size}, packs_dir, modes={shape: mode})
    assert [len(j.runs) for j in jobs] == [10, 10] and {j.pack_mode for j in jobs} == {mode}
    spec = write_job_spec(jobs[0], lambda run: WorkerSpec(config={}, experiment="e", run_dir=str(run.run_dir)))
    written = PackSpec(**json.loads(spec.read_text()))
    assert (written.mode, written.size, len(written.members)) == (mode, 10, 10)


def test_choose_mode_needs_streams_strictly_faster_within_memory():
    entry = {"free_bytes": 100 * GiB, "results": MEASURED, "streams": STREAMS_FAST}
    assert autopack.choose_mode(entry, jobs_per_gpu=1, cap=50) == (10, "streams")  # 30000 > fused 25's 26000
    assert autopack.choose_mode({**entry, "free_bytes": GiB}, jobs_per_gpu=1, cap=50) == (2, "streams")  # 8000 > 7500
    assert autopack.choose_mode({**entry, "streams": MEASURED}, jobs_per_gpu=1, cap=50) == (25, "fused")  # a tie
    assert autopack.choose_mode({**entry, "streams": STREAMS_SLOW}, jobs_per_gpu=1, cap=50) == (25, "fused")
    assert autopack.choose_mode({**entry, "streams": []}, jobs_per_gpu=1, cap=50) == (25, "fused")


def test_the_calibration_times_streams_too(tmp_path):
    out = autopack.measure(("resnet8", 10, 20, "bf16"), [1, 2], "cpu", None, steps=1, warmup=0)
    assert [m["members"] for m in out["streams"]] == [1, 2]
    assert all(m["images_per_second"] > 0 and m["peak_bytes"] == 0 for m in out["streams"])

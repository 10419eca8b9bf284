"""``chronoedit serve --devices``: one worker process per device over the one SQLite queue (here two CPU workers on
the tiny checkpoint). Each job runs exactly once, both workers take jobs, a worker killed in the middle of a job has
that job re-run, health shows every worker, shutdown ends every worker process, bad --devices is one line."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from serve_helpers import free_port, png_bytes, submit

from chronoedit import cli
from chronoedit.commands.serve import build_state
from chronoedit.serve import pool
from chronoedit.serve.app import create_app
from chronoedit.serve.store import DONE, FAILED, MAX_ATTEMPTS, QUEUED, RUNNING, JobStore

FLAGS = ["--height", "32", "--width", "32", "--num-inference-steps", "1", "--quiet"]
LONG = 100  # steps of a job long enough to catch while it runs (the server's --max-steps)


def serve_args(tiny_ckpt: Path, state_dir: Path, devices: str) -> Any:
    return cli.parse_args(["serve", "--state-dir", str(state_dir), "--model-path", str(tiny_ckpt), *FLAGS,
                           "--devices", devices])  # fmt: skip


def wait_for(condition: Any, what: str, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not happen in {timeout:g} s")


def all_ready(client: TestClient) -> list[dict[str, Any]]:
    workers = client.get("/v1/health").json()["workers"]
    return workers if all(w["alive"] and w["state"] == "ready" for w in workers) else []


def finished(state: Any, ids: list[str]) -> list[Any]:
    """The jobs ``ids`` once every one is done (else an empty list)."""
    jobs = [state.store.get(job_id) for job_id in ids]
    return jobs if all(job.status == DONE for job in jobs) else []


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A server with two CPU worker processes, built as ``chronoedit serve --devices cpu,cpu`` builds it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CHRONOEDIT_API_TOKEN", raising=False)
        state = build_state(serve_args(tiny_ckpt, tmp_path_factory.mktemp("serve_devices"), "cpu,cpu"))
        with TestClient(create_app(state)) as client:
            wait_for(lambda: all_ready(client), "both workers loading the model")
            yield client, state
        pids = [slot.process for slot in state.worker.slots]
        state.store.close()
    assert pids == [None, None] and not multiprocessing.active_children()  # every worker ended and was reaped


def test_fifty_jobs_each_run_exactly_once_and_both_workers_take_jobs(server):
    client, state = server
    ids = [submit(client, {"prompt": f"edit {i}", "seed": i}, image=png_bytes((32, 32))).json()["id"]
           for i in range(50)]  # fmt: skip
    jobs = wait_for(lambda: finished(state, ids), "50 jobs finishing")
    assert [job.attempts for job in jobs] == [1] * 50  # each claimed (run) exactly once
    assert all((state.results_dir / job.id / job.files["result"]).is_file() for job in jobs)
    slots = {job.worker.split("@")[0] for job in jobs}
    assert slots == {"0", "1"}  # both workers took jobs
    assert client.get(f"/v1/edits/{ids[-1]}/result").status_code == 200
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["queue"]["queued"] == 0
    assert sum(w["jobs_run"] for w in health["workers"]) >= 50


def test_health_shows_every_worker(server):
    client, _state = server
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["worker"]["state"] == "ready" and health["worker"]["alive"]
    workers = health["workers"]
    assert [(w["index"], w["device"]) for w in workers] == [(0, "cpu"), (1, "cpu")]
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert {p.pid for p in multiprocessing.active_children()} >= set(pids)  # real child processes of the server
    assert all(w["alive"] and w["state"] == "ready" and w["error"] is None for w in workers)


def _catch_running(client: TestClient, state: Any) -> tuple[str, dict[str, Any]]:
    """A long job caught running (its progress seen through the API) on a worker frozen with SIGSTOP, with the
    queue confirming the frozen worker holds it: (job id, that worker's health entry)."""
    for _ in range(5):
        job_id = submit(client, {"prompt": "long", "seed": 7, "num_inference_steps": LONG}).json()["id"]
        status = wait_for(lambda i=job_id: (s := client.get(f"/v1/edits/{i}").json())["progress"]["step"] >= 1 and s,
                          "the job's first step")  # fmt: skip
        assert status["status"] == RUNNING and status["progress"]["total"] == LONG  # progress crossed the process
        worker = next((w for w in client.get("/v1/health").json()["workers"] if w["job"] == job_id), None)
        if worker is not None:
            os.kill(worker["pid"], signal.SIGSTOP)
            job = state.store.get(job_id)
            if job.status == RUNNING and job.worker == f"{worker['index']}@{worker['pid']}":
                return job_id, worker
            os.kill(worker["pid"], signal.SIGCONT)  # it finished meanwhile: try again
        wait_for(lambda i=job_id: state.store.get(i).status == DONE, "the job finishing")
    raise AssertionError("never caught a job running")


def test_a_worker_killed_mid_job_has_its_job_run_again(server):
    client, state = server
    job_id, victim = _catch_running(client, state)
    os.kill(victim["pid"], signal.SIGKILL)
    job = wait_for(lambda: (j := state.store.get(job_id)).status in (DONE, FAILED) and j, "the re-run")
    assert job.status == DONE and job.attempts == 2  # run once more, after the killed attempt
    assert job.worker != f"{victim['index']}@{victim['pid']}"
    workers = wait_for(lambda: all_ready(client), "the replacement worker loading")
    replaced = workers[victim["index"]]
    assert replaced["restarts"] >= 1 and replaced["pid"] != victim["pid"]
    assert client.get(f"/v1/edits/{job_id}/result").status_code == 200


def test_stop_ends_every_worker_and_requeues_the_running_job(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("CHRONOEDIT_API_TOKEN", raising=False)
    state = build_state(serve_args(tiny_ckpt, tmp_path, "cpu"))
    with TestClient(create_app(state)) as client:
        wait_for(lambda: all_ready(client), "the worker loading")
        long = submit(client, {"prompt": "long", "seed": 1, "num_inference_steps": LONG}).json()["id"]
        queued = submit(client, {"prompt": "queued", "seed": 2}).json()["id"]
        wait_for(lambda: client.get(f"/v1/edits/{long}").json()["progress"]["step"] >= 1, "the first step")
        assert client.delete(f"/v1/edits/{queued}").json()["status"] == "cancelled"
        pid = client.get("/v1/health").json()["workers"][0]["pid"]
    assert state.worker.slots[0].process is None and not Path(f"/proc/{pid}").exists()  # ended and reaped
    job = state.store.get(long)
    assert job.status == QUEUED and job.attempts == 0  # interrupted by the shutdown: runs again, not counted
    state.store.close()


def test_a_worker_that_keeps_dying_is_left_down_and_health_says_so(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("CHRONOEDIT_API_TOKEN", raising=False)
    state = build_state(serve_args(tiny_ckpt, tmp_path, "cpu"))
    state.worker.max_restarts = 1
    with TestClient(create_app(state)) as client:
        first = wait_for(lambda: all_ready(client), "the worker loading")[0]
        os.kill(first["pid"], signal.SIGKILL)  # replaced
        second = wait_for(lambda: [w for w in all_ready(client) if w["restarts"] == 1], "the replacement")[0]
        assert second["pid"] != first["pid"]
        os.kill(second["pid"], signal.SIGKILL)  # left down
        health = wait_for(lambda: (h := client.get("/v1/health").json())["status"] == "error" and h, "giving up")
        assert health["workers"][0]["state"] == "error" and not health["workers"][0]["alive"]
        assert "died 2 times" in health["worker"]["error"] and "not restarted" in health["worker"]["error"]
        answer = submit(client, {"prompt": "x"})
        assert answer.status_code == 503 and "died 2 times" in answer.json()["detail"]
    state.store.close()


CLAIMER = """
import json, sys, time
from chronoedit.serve.store import JobStore
store = JobStore(sys.argv[1], owner=False)
print("ready", flush=True)
sys.stdin.readline()  # go
ids = []
while (job := store.claim_next(sys.argv[2])) is not None:
    ids.append(job.id)
    time.sleep(0.01)  # "runs" it: the other claimer gets its turns
    store.finish(job.id, {}, {}, {})
store.close()
print(json.dumps(ids), flush=True)
"""


def test_two_processes_claiming_at_once_never_share_a_job(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    ids = [store.submit({"prompt": str(i)}, 1000).id for i in range(100)]
    claimers = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(store.path), worker], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for worker in ("0@1", "1@2")]  # fmt: skip
    try:
        assert [claimer.stdout.readline() for claimer in claimers] == ["ready\n", "ready\n"]
        for claimer in claimers:
            claimer.stdin.write("go\n")  # both claim at the same time
            claimer.stdin.flush()
        got = [json.loads(claimer.communicate(timeout=60)[0]) for claimer in claimers]
    finally:
        for claimer in claimers:
            claimer.kill()
            claimer.wait()
    assert sorted(got[0] + got[1]) == sorted(ids) and not set(got[0]) & set(got[1])  # each job exactly once
    assert got[0] and got[1]  # both claimed: the claims did race
    jobs = [store.get(job_id) for job_id in ids]
    assert all(job.status == DONE and job.attempts == 1 for job in jobs)
    assert {job.id for job in jobs if job.worker == "0@1"} == set(got[0])  # the queue records who claimed it
    store.close()


def test_requeue_worker_counts_deaths_not_shutdowns(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        first, second = (store.submit({"prompt": p}, 10).id for p in ("a", "b"))
        assert store.claim_next("0@1").id == first and store.claim_next("1@2").id == second
        assert store.requeue_worker("1@2", died=False) == [second] and store.get(second).attempts == 0
        assert store.requeue_worker("0@1") == [first] and store.get(first).attempts == 1
        for attempt in range(2, MAX_ATTEMPTS + 1):
            assert store.claim_next(f"0@{attempt}").id == first  # it keeps its place in the queue
            store.requeue_worker(f"0@{attempt}")
        job = store.get(first)
        assert job.status == FAILED and "died" in job.error and job.attempts == MAX_ATTEMPTS
    finally:
        store.close()


@pytest.mark.parametrize(
    ("devices", "message"),
    [("", "--devices needs devices"), ("cpu,,cpu", "--devices needs devices"), ("tpu:0", "--devices"),
     ("cuda:0,cuda:1", "--devices cuda:0: CUDA is not available")],
)  # fmt: skip
def test_bad_devices_are_one_line_before_anything_loads(tiny_ckpt, tmp_path, capsys, devices, message):
    argv = ["serve", "--state-dir", str(tmp_path / "state"), "--model-path", str(tiny_ckpt), "--port",
            str(free_port()), *FLAGS, "--devices", devices]  # fmt: skip
    before = set(multiprocessing.active_children())  # the module's server's workers, when it runs
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("chronoedit: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "state").exists() and set(multiprocessing.active_children()) == before  # nothing started


def test_devices_with_device_is_one_line(tiny_ckpt, tmp_path, capsys):
    argv = ["serve", "--state-dir", str(tmp_path), "--model-path", str(tiny_ckpt), "--port", str(free_port()),
            *FLAGS, "--device", "cpu", "--devices", "cpu,cpu"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "not both" in capsys.readouterr().err


def test_parse_devices_refuses_a_device_twice_but_cpu_may_repeat(monkeypatch):
    monkeypatch.setattr("chronoedit.devices.resolve_device", lambda name, field="device": name)  # as if present
    assert pool.parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert pool.parse_devices("cpu,cpu") == ["cpu", "cpu"]
    for text in ("cuda:0,cuda:0", "cuda,cuda:0"):
        with pytest.raises(pool.UserError, match="cuda:0 twice"):
            pool.parse_devices(text)
    with pytest.raises(pool.UserError, match="mixes device types"):
        pool.parse_devices("cpu,cuda:0")

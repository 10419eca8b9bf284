"""``chronoedit serve`` on the demo model: submit, poll, fetch; limits; malformed requests; auth; concurrency."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")

import httpx
from fastapi.testclient import TestClient
from serve_helpers import (
    TINY_FLAGS,
    FakePipe,
    fake_load,
    free_port,
    make_state,
    png_bytes,
    running_server,
    submit,
    wait_finished,
    wait_ready,
    workers_end_here,
)

from chronoedit.serve.app import create_app
from chronoedit.serve.guards import FORM_SLACK_BYTES


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    return tmp_path_factory.mktemp("chronoedit_home")


@pytest.fixture(autouse=True)
def _home(monkeypatch, demo_home):
    monkeypatch.setenv("CHRONOEDIT_HOME", str(demo_home))
    monkeypatch.delenv("CHRONOEDIT_MODEL_PATH", raising=False)
    monkeypatch.delenv("CHRONOEDIT_API_TOKEN", raising=False)


@pytest.fixture(autouse=True)
def _workers_end_with_their_test():
    """The workers of the servers a test made have stopped, and their threads ended, before the next test starts."""
    with workers_end_here():
        yield


@pytest.fixture(scope="module")
def client(tmp_path_factory, demo_home):
    """One server for the module (the model loads once), with small limits to test against."""
    with pytest.MonkeyPatch.context() as mp, workers_end_here():
        mp.setenv("CHRONOEDIT_HOME", str(demo_home))
        mp.delenv("CHRONOEDIT_MODEL_PATH", raising=False)
        mp.delenv("CHRONOEDIT_API_TOKEN", raising=False)
        state = make_state(tmp_path_factory.mktemp("serve"), "--max-upload-mb", "0.05", "--max-input-pixels",
                           "40000", "--max-steps", "6", "--max-reasoning-steps", "3")  # fmt: skip
        with TestClient(create_app(state)) as test_client:
            assert wait_ready(test_client)["status"] == "ok"
            yield test_client


def test_submit_poll_and_fetch_result(client):
    response = submit(client, {"prompt": "put a red hat on the cup", "seed": 7, "output_format": "webp"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in ("queued", "running") and job["settings"]["seed"] == 7
    assert job["settings"]["num_inference_steps"] == 2 and (job["settings"]["width"], job["settings"]["height"]) == (
        32,
        32,
    )
    status = wait_finished(client, job["id"])
    assert status["status"] == "done", status
    assert status["progress"] == {"step": 2, "total": 2, "stage": None}
    assert status["settings"]["prompt_used"] == "put a red hat on the cup" and status["settings"]["seed"] == 7
    assert status["timings"]["generate_s"] > 0
    result = client.get(status["links"]["result"])
    assert result.status_code == 200 and result.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(result.content))
    assert image.format == "WEBP" and image.size == (32, 32)
    stored_input = Image.open(io.BytesIO(client.get(f"/v1/edits/{job['id']}/input").content))
    assert stored_input.size == (48, 32)
    assert client.get(f"/v1/edits/{job['id']}/trajectory").status_code == 404  # not asked for


def test_same_seed_same_result_and_trajectory(client):
    options = {"prompt": "melt the cup", "seed": 3, "enable_temporal_reasoning": True,
               "num_temporal_reasoning_steps": 1, "return_trajectory": True}  # fmt: skip
    first = wait_finished(client, submit(client, options).json()["id"])
    second = wait_finished(client, submit(client, {**options, "return_trajectory": False}).json()["id"])
    assert first["status"] == second["status"] == "done"
    assert client.get(first["links"]["result"]).content == client.get(second["links"]["result"]).content
    video = client.get(first["links"]["trajectory"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and len(video.content) > 1000
    sheet = Image.open(io.BytesIO(client.get(first["links"]["trajectory-sheet"]).content))
    assert sheet.width > 32 * 4  # several frames side by side
    assert "trajectory" not in second["links"]


def test_preset_changes_settings(client):
    # distill needs its LoRA file: the demo model has none, so the request is refused before queueing.
    response = submit(client, {"prompt": "a hat", "preset": "distill"})
    assert response.status_code == 422
    assert response.json()["detail"] == "preset distill needs a *distill* LoRA: pass it with the server's --lora-path"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"prompt": "x", "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "preset": "nope"}, "preset"),
        ({"seed": 1}, "prompt: Field required"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x", "num_inference_steps": 7}, "over this server's limit of 6"),
        ({"prompt": "x", "num_inference_steps": 6, "enable_temporal_reasoning": True,
          "num_temporal_reasoning_steps": 4}, "limit of 3"),
        ({"prompt": "x", "return_trajectory": True}, "return_trajectory needs enable_temporal_reasoning"),
        ({"prompt": "x", "enable_temporal_reasoning": True, "num_temporal_reasoning_steps": 5},
         "num_temporal_reasoning_steps must be between 0 and num_inference_steps (2), got 5"),
        ({"prompt": "x", "enable_temporal_reasoning": "yes"}, "enable_temporal_reasoning"),
        ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": "5"}, "guidance_scale"),
        ({"prompt": "x", "seed": 1e18}, "seed"),
        ('{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
        ({"prompt": "x", "num_inference_steps": 10**400}, "num_inference_steps"),
        ("{not json", "options: "),
        ('["a list"]', "options: "),
    ],
)
def test_bad_options_are_422_with_a_clear_message(client, options, fragment):
    response = submit(client, options)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment in detail


@pytest.mark.parametrize(
    ("image", "status", "fragment"),
    [
        (b"not an image at all", 400, "cannot be read"),
        (b"", 400, "empty"),
        (png_bytes()[:40], 400, "cannot be read"),  # truncated PNG
        (png_bytes((300, 200)), 413, "pixels"),  # 60000 pixels > 40000
        (b"\0" * 60_000, 413, "upload limit"),  # 60 kB > 0.05 MB
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 400, "cannot be read"),  # no EPS renderer
    ],
)
def test_bad_images_are_4xx(client, image, status, fragment):
    response = submit(client, {"prompt": "x"}, image=image)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def test_malformed_requests_are_4xx(client):
    assert client.post("/v1/edits", data={"options": json.dumps({"prompt": "x"})}).status_code == 422  # no image
    no_options = client.post("/v1/edits", files={"image": ("a.png", png_bytes(), "image/png")})
    assert no_options.status_code == 422 and "options" in no_options.json()["detail"]
    assert client.post("/v1/edits", content=b"garbage", headers={"content-type": "text/plain"}).status_code == 422
    assert client.get("/v1/edits/not-a-job-id-at-all").status_code == 404
    assert client.get("/v1/edits/../../etc/passwd").status_code == 404
    assert client.get("/v1/edits/" + "A" * 22 + "/result").status_code == 404
    assert client.get("/v1/edits/" + "A" * 22 + "/whatever").status_code == 404
    assert client.put("/v1/edits").status_code == 405


def test_health_config_and_openapi(client):
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["worker"]["state"] == "ready" and health["queue"]["limit"] == 100
    config = client.get("/v1/config").json()
    assert {p["name"] for p in config["presets"]} >= {"distill", "upscale", "paint-brush"}
    assert config["limits"]["max_steps"] == 6 and config["defaults"]["num_inference_steps"] == 2
    spec = client.get("/openapi.json").json()
    assert "/v1/edits" in spec["paths"] and "/v1/edits/{job_id}" in spec["paths"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"  # /docs can send the token
    assert spec["paths"]["/v1/edits"]["post"]["security"] == [{"HTTPBearer": []}]


def test_fifty_concurrent_submissions_all_complete(tmp_path, demo_home):
    state = make_state(tmp_path)
    with running_server(create_app(state)) as url, httpx.Client(base_url=url, timeout=60) as http:
        wait_ready(http)

        def one(i: int) -> str:
            response = submit(http, {"prompt": f"edit {i}", "seed": i}, image=png_bytes(color=(i * 5, 100, 200)))
            assert response.status_code == 202, response.text
            return response.json()["id"]

        with ThreadPoolExecutor(max_workers=50) as pool:
            ids = list(pool.map(one, range(50)))
        assert len(set(ids)) == 50
        statuses = [wait_finished(http, job_id, timeout=300) for job_id in ids]
        assert [s["status"] for s in statuses] == ["done"] * 50
        started = sorted(statuses, key=lambda s: s["started_at"])
        assert all(a["finished_at"] <= b["started_at"] for a, b in itertools.pairwise(started))  # one at a time
        for status in statuses[:5]:
            assert Image.open(io.BytesIO(http.get(status["links"]["result"]).content)).size == (32, 32)
    assert state.worker.jobs_run == 50


def test_queue_limit_cancel_and_restart(tmp_path, demo_home):
    """With the worker held back: 429 when full, cancel, and a restart keeps the queue (and re-queues running)."""
    from chronoedit.editing import load_pipeline

    gate = threading.Event()

    def held_back(spec, report):  # type: ignore[no-untyped-def]
        gate.wait(60)  # not forever: a failing assertion below must not leave the load waiting
        return load_pipeline(spec, report)

    state = make_state(tmp_path, "--max-queue", "3", load=held_back)
    with TestClient(create_app(state)) as client:
        ids = [submit(client, {"prompt": f"job {i}", "seed": i}).json()["id"] for i in range(3)]
        full = submit(client, {"prompt": "one too many"})
        assert full.status_code == 429 and "queue is full" in full.json()["detail"]
        assert full.headers["retry-after"]
        assert client.get(f"/v1/edits/{ids[2]}").json()["position"] == 3
        assert client.delete(f"/v1/edits/{ids[0]}").json()["status"] == "cancelled"
        assert client.get(f"/v1/edits/{ids[1]}").json()["position"] == 1
        assert client.get(f"/v1/edits/{ids[1]}/result").status_code == 409
        gate.set()  # the lifespan stops the worker; it may or may not start a job before it does
    state.store.claim_next()  # as if the process died in the middle of a job
    state.store.close()

    restarted = make_state(tmp_path, "--max-queue", "3")
    assert restarted.store.requeued in (1, 2)
    with TestClient(create_app(restarted)) as client:
        results = [wait_finished(client, job_id) for job_id in ids]
        assert [r["status"] for r in results] == ["cancelled", "done", "done"]
        assert client.delete(f"/v1/edits/{ids[1]}").status_code == 409  # finished jobs cannot be cancelled


def test_bearer_token(tmp_path, demo_home, monkeypatch):
    monkeypatch.setenv("CHRONOEDIT_API_TOKEN", "s3cret")
    state = make_state(tmp_path)
    with TestClient(create_app(state)) as client:
        assert client.get("/v1/health").status_code == 200  # liveness stays open
        denied = submit(client, {"prompt": "x"})
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert submit(client, {"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = submit(client, {"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 202
        assert client.get(f"/v1/edits/{ok.json()['id']}").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert wait_finished(client, ok.json()["id"], headers=auth)["status"] == "done"


def _start_server(state_dir, port, env):
    command = [sys.executable, "-m", "chronoedit.cli", "serve", "--state-dir", str(state_dir), "--port", str(port),
               *TINY_FLAGS, "--max-steps", "200"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_up(process, url):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(url + "/v1/health").json()["worker"]["state"] == "ready":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not come up")


def test_sigkill_mid_job_then_restart_runs_it_again(tmp_path, demo_home):
    """The real command, killed with SIGKILL while a job runs: after a restart the job is re-queued and completes,
    the job queued behind it too, and no partial output is left behind."""
    env = {**os.environ, "CHRONOEDIT_HOME": str(demo_home)}
    env.pop("CHRONOEDIT_API_TOKEN", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port, env)
    try:
        _wait_up(server, url)
        with httpx.Client(base_url=url, timeout=30) as http:
            long_job = submit(http, {"prompt": "slow", "num_inference_steps": 120, "seed": 1}).json()["id"]
            queued_job = submit(http, {"prompt": "next", "seed": 2}).json()["id"]
            deadline = time.monotonic() + 60
            while http.get(f"/v1/edits/{long_job}").json()["progress"]["step"] < 2:
                assert time.monotonic() < deadline, "the long job did not start"
                time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    finally:
        server.kill()
    assert not list((tmp_path / "results" / long_job).glob("result*"))

    server = _start_server(tmp_path, port, env)
    try:
        _wait_up(server, url)
        with httpx.Client(base_url=url, timeout=30) as http:
            first = wait_finished(http, long_job, timeout=240)
            second = wait_finished(http, queued_job, timeout=60)
            assert (first["status"], second["status"]) == ("done", "done")
            assert first["progress"] == {"step": 120, "total": 120, "stage": None}
            assert first["finished_at"] <= second["started_at"]  # still in submission order
            assert Image.open(io.BytesIO(http.get(first["links"]["result"]).content)).size == (32, 32)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    assert "re-queued 1 job" in server.stderr.read()
    leftovers = [p.name for p in (tmp_path / "results").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_a_job_that_keeps_killing_the_server_is_failed_after_three_tries(tmp_path):
    from chronoedit.serve.store import MAX_ATTEMPTS, JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    poison = store.submit({"prompt": "boom"}, max_pending=10).id
    other = store.submit({"prompt": "fine"}, max_pending=10).id
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert store.claim_next().id == poison  # the process "dies" while running it
        store.close()
        store = JobStore(tmp_path / "jobs.sqlite3")
        assert store.requeued == (1 if attempt < MAX_ATTEMPTS else 0)
    job = store.get(poison)
    assert job.status == "failed" and "stopped 3 times" in job.error
    assert store.claim_next().id == other


def test_exif_orientation_is_applied(client):
    image = Image.new("RGB", (60, 30), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the photo is upright at 30x60
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    job = submit(client, {"prompt": "x", "seed": 1}, image=buf.getvalue()).json()
    stored = Image.open(io.BytesIO(client.get(f"/v1/edits/{job['id']}/input").content))
    assert stored.size == (30, 60)
    wait_finished(client, job["id"])


def test_decompression_bomb_is_413_without_decoding(client):
    buf = io.BytesIO()
    Image.new("1", (14_000, 14_000)).save(buf, "PNG")  # 196 M pixels in ~25 kB
    response = submit(client, {"prompt": "x"}, image=buf.getvalue())
    assert response.status_code == 413 and "pixels" in response.json()["detail"]


def test_worker_survives_a_queue_error_and_a_dead_worker_refuses_jobs(tmp_path, demo_home):
    state = make_state(tmp_path)
    real_claim, calls = state.store.claim_next, []

    def flaky_claim():
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real_claim()

    state.store.claim_next = flaky_claim
    state.worker.poll_s = 0.05
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "x", "seed": 1}).json()["id"]
        assert wait_finished(client, job)["status"] == "done"  # the worker went on after the error
        def dying(job):
            raise SystemExit("boom")  # not an Exception: ends the worker's loop

        state.worker.run_job = dying
        submit(client, {"prompt": "y"})
        deadline = time.monotonic() + 30
        while state.worker.alive:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/v1/health").json()["status"] == "error"
        refused = submit(client, {"prompt": "z"})
        assert refused.status_code == 503 and "cannot run edits" in refused.json()["detail"]


def test_a_bug_in_a_job_fails_it_as_an_internal_error_and_the_worker_goes_on(tmp_path, demo_home, caplog):
    """A job whose run raises anything but a user error: failed with "internal error" (nothing of the bug shown to
    the client), its traceback in the server's log, and the worker runs the next job."""
    pipe = FakePipe(fail=("boom",))
    state = make_state(tmp_path, load=fake_load(pipe))
    with caplog.at_level(logging.INFO, logger="chronoedit.serve"), TestClient(create_app(state)) as client:
        assert wait_ready(client)["worker"]["state"] == "ready"
        bug, fine = (submit(client, {"prompt": prompt, "seed": 1}).json()["id"] for prompt in ("boom", "fine"))
        failed, done = wait_finished(client, bug), wait_finished(client, fine)
        health = client.get("/v1/health").json()
        result = client.get(f"/v1/edits/{fine}/result")
    assert (failed["status"], failed["error"]) == ("failed", "internal error: see the server's log")
    assert "links" in failed and "result" not in failed["links"]
    assert done["status"] == "done" and done["error"] is None and pipe.prompts == ["boom", "fine"]
    assert result.status_code == 200 and Image.open(io.BytesIO(result.content)).size == (32, 32)
    assert health["status"] == "ok" and health["worker"]["state"] == "ready" and health["worker"]["error"] is None
    assert state.worker.jobs_run == 2
    (record,) = [r for r in caplog.records if bug in r.getMessage()]
    assert record.name == "chronoedit.serve" and record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert "Traceback (most recent call last)" in caplog.text
    assert "RuntimeError: a bug while editing 'boom'" in caplog.text
    assert not [r for r in caplog.records if fine in r.getMessage() and r.levelno >= logging.WARNING]


def test_clean_shutdown_interrupts_the_running_job_and_requeues_it(tmp_path, demo_home):
    state = make_state(tmp_path, "--max-steps", "500")
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "slow", "num_inference_steps": 500}).json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/edits/{job}").json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop_started = time.monotonic()
    assert time.monotonic() - stop_started < 10  # stopped at the next step, not after 500
    stored = state.store.get(job)
    assert stored.status == "queued" and stored.attempts == 0 and stored.position == 1


def test_auth_and_size_are_checked_before_the_body_is_read(tmp_path, demo_home, monkeypatch):
    monkeypatch.setenv("CHRONOEDIT_API_TOKEN", "s3cret")
    state = make_state(tmp_path, "--max-upload-mb", "1")
    with TestClient(create_app(state)) as client:
        multipart = {"content-type": "multipart/form-data; boundary=x"}
        garbage = client.post("/v1/edits", content=b"--x\r\nnot multipart", headers=multipart)
        assert garbage.status_code == 401
        big = client.post("/v1/edits", content=b"0" * (3 << 20), headers={"Authorization": "Bearer s3cret",
                          "content-type": "multipart/form-data; boundary=x"})  # fmt: skip
        assert big.status_code == 413 and "limit" in big.json()["detail"]


def test_a_chunked_upload_is_not_read_past_the_limit(tmp_path, demo_home, monkeypatch):
    """Without Content-Length the body is counted as it arrives: 413 at the limit, nothing spooled beyond it."""
    from starlette.datastructures import UploadFile

    spooled = []
    write = UploadFile.write

    async def counting(self, data):  # type: ignore[no-untyped-def]
        spooled.append(len(data))
        return await write(self, data)

    monkeypatch.setattr(UploadFile, "write", counting)
    state = make_state(tmp_path, "--max-upload-mb", "0.05")
    allowed = state.limits.max_upload_bytes + FORM_SLACK_BYTES

    def body():  # 64 MB of "image" in 1 MB chunks: httpx sends it chunked
        yield b'--x\r\nContent-Disposition: form-data; name="options"\r\n\r\n{"prompt": "a hat"}\r\n'
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        yield from (b"\0" * (1 << 20) for _ in range(64))
        yield b"\r\n--x--\r\n"

    with running_server(create_app(state)) as url:
        response = httpx.post(url + "/v1/edits", content=body(), timeout=60,
                              headers={"content-type": "multipart/form-data; boundary=x"})  # fmt: skip
    assert response.status_code == 413
    assert response.json()["detail"] == "the upload is over this server's limit of 52428 bytes"
    assert sum(spooled) <= allowed


def test_one_queue_one_server(tmp_path):
    from chronoedit.serve.store import JobStore, StoreInUse

    first = JobStore(tmp_path / "jobs.sqlite3")
    with pytest.raises(StoreInUse, match="another chronoedit serve"):
        JobStore(tmp_path / "jobs.sqlite3")
    first.close()
    JobStore(tmp_path / "jobs.sqlite3").close()  # free again once the first is closed


def test_errors_shown_to_clients_carry_no_server_paths(tmp_path):
    """Real user errors (a missing input, a preset whose LoRA the model folder lacks), in the API's words, with the
    server's folders replaced by placeholders."""
    from chronoedit.errors import UserError
    from chronoedit.media import load_image
    from chronoedit.presets import find_preset_loras, get_preset
    from chronoedit.serve.editing import api_message, redact

    results, model = tmp_path / "state" / "results", tmp_path / "models" / "ckpt"
    model.mkdir(parents=True)
    with pytest.raises(UserError) as missing:
        load_image(results / "abc" / "input.png")
    with pytest.raises(UserError) as no_lora:
        find_preset_loras(get_preset("distill"), [], model)
    assert str(tmp_path) in str(missing.value) and str(model) in str(no_lora.value)  # the server's own words
    folders = {"<results>": results, "<model>": model}
    shown = [redact(api_message(error.value), folders) for error in (missing, no_lora)]
    assert shown == ["input image not found: <results>/abc/input.png",
                     "preset distill needs a *distill* LoRA: pass it with the server's --lora-path (none in "
                     "<model>/lora)"]  # fmt: skip
    assert all(str(tmp_path) not in text for text in shown)

    state = make_state(tmp_path / "state", "--model-path", str(model))  # the worker shows clients the same
    assert [state.worker.public_error(error.value) for error in (missing, no_lora)] == shown


def test_a_relative_state_dir_is_hidden_without_touching_words(tmp_path, demo_home, monkeypatch):
    """``--state-dir st``: its absolute path is hidden, and "num_inference_steps" keeps its "st"."""
    monkeypatch.chdir(tmp_path)
    with TestClient(create_app(make_state(Path("st"), "--max-steps", "4"))) as client:
        response = submit(client, {"prompt": "x", "num_inference_steps": 5})
    assert response.status_code == 422
    assert response.json()["detail"] == "num_inference_steps 5 is over this server's limit of 4"
    from chronoedit.serve.editing import redact

    state = {"<state>": Path("st")}
    for shown in (f"cannot write {tmp_path}/st/results/x", "cannot write st/results/x", "cannot write 'st/results/x'"):
        assert redact(shown, state).replace("'", "") == "cannot write <state>/results/x"
    words = "num_inference_steps in steps/st.png or best/st"
    assert redact(words, state) == words


def test_a_hub_id_models_cache_folder_is_hidden(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from chronoedit.serve.editing import redact

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    state = make_state(tmp_path / "state", "--model-path", "acme/ChronoEdit-14B-Diffusers")
    error = f"no weights in {tmp_path}/hub/models--acme--ChronoEdit-14B-Diffusers/snapshots/aaaa/transformer"
    assert redact(error, state.worker.redact) == "no weights in <hub-cache>/models--acme--ChronoEdit-14B-Diffusers/" \
        "snapshots/aaaa/transformer"


def test_enhance_prompt_through_an_openai_compatible_endpoint(tmp_path, demo_home, client):
    from vlm_fakes import FakeOpenAIServer, user_images

    dense = ("The user wants to put a red hat on the cup. The hat sits on the rim, the cup, the table and the light "
             "stay exactly as they are; the camera does not move.")  # fmt: skip
    fake = FakeOpenAIServer(lambda request: dense)
    try:
        state = make_state(tmp_path, "--prompt-enhancer-base-url", fake.url, "--prompt-enhancer-model", "qwen-vl")
        with TestClient(create_app(state)) as enhanced_client:
            assert enhanced_client.get("/v1/config").json()["prompt_enhancer"] is True
            job = submit(enhanced_client, {"prompt": "red hat", "enhance_prompt": True, "seed": 1}).json()
            status = wait_finished(enhanced_client, job["id"])
            assert status["status"] == "done", status
            assert status["settings"]["prompt_used"] == dense
            assert enhanced_client.get(status["links"]["prompt"]).text.strip() == dense
    finally:
        fake.close()
    (request,) = fake.requests
    assert request["model"] == "qwen-vl" and "red hat" in json.dumps(request["messages"])
    assert [image.size for image in user_images(request)] == [(32, 32)]  # the job's resized input
    # A server without an enhancer refuses the option.
    refused = submit(client, {"prompt": "x", "enhance_prompt": True})
    assert refused.status_code == 422 and "no prompt enhancer" in refused.json()["detail"]


def test_a_local_enhancer_is_refused_at_start(tmp_path, demo_home):
    with pytest.raises(ValueError, match="--prompt-enhancer-base-url"):
        make_state(tmp_path, "--prompt-enhancer-model", "Qwen/Qwen3-VL-8B-Instruct")


def test_the_model_loads_once_when_threads_ask_at_once(tmp_path):
    """Two loads at once would build modules on the meta device concurrently; callers wait for the one load."""
    loads = []

    def slow_load(spec, report):  # type: ignore[no-untyped-def]
        loads.append(spec)
        time.sleep(0.2)
        return FakePipe()

    runner = make_state(tmp_path, load=slow_load).worker.runner  # the worker is not started
    with ThreadPoolExecutor(max_workers=4) as pool:
        pipes = list(pool.map(lambda _: runner.load(), range(4)))
    assert len(loads) == 1 and all(pipe is pipes[0] for pipe in pipes)


# ---------------------------------------------------------------- retention (--keep-results-hours)


def test_retention_deletes_only_finished_jobs_past_the_period_and_stray_folders(tmp_path):
    from chronoedit.serve.retention import Retention
    from chronoedit.serve.store import JobStore

    store, results = JobStore(tmp_path / "jobs.sqlite3"), tmp_path / "results"
    ids = {name: store.submit({"prompt": name}, 10).id for name in ("done", "failed", "cancelled", "running", "queued")}
    for job_id in ids.values():
        (results / job_id).mkdir(parents=True)
        (results / job_id / "input.png").write_bytes(b"x")
    assert store.claim_next().id == ids["done"]
    store.finish(ids["done"], {"result": "result.png"}, {}, {})
    assert store.claim_next().id == ids["failed"]
    store.fail(ids["failed"], "boom")
    assert store.cancel(ids["cancelled"])
    assert store.claim_next().id == ids["running"]
    keep, grace = 3600.0, 60.0
    retention = Retention(store, results, keep, grace_s=grace)
    folders = lambda: sorted(p.name for p in results.iterdir())  # noqa: E731

    assert retention.sweep() == (0, 0)  # all finished just now
    later = time.time() + 2 * keep
    assert retention.sweep(now=later) == (3, 0)  # records go now, their folders after the grace period
    left = {"running", "queued"}
    assert store.ids() == {ids[name] for name in left} and folders() == sorted(ids.values())
    assert retention.sweep(now=later + grace / 2) == (0, 0)
    assert retention.sweep(now=later + grace) == (0, 3)
    assert folders() == sorted(ids[name] for name in left)
    assert store.get(ids["running"]).status == "running" and store.get(ids["queued"]).status == "queued"

    old, fresh = results / "stray-old", results / "stray-fresh"  # e.g. a submission that died before queueing
    for folder in (old, fresh):
        folder.mkdir()
    long_ago = time.time() - 2 * keep
    for folder in (old, results / ids["queued"]):
        os.utime(folder, (long_ago, long_ago))
    assert retention.sweep() == (0, 1)
    assert not old.exists() and fresh.exists() and (results / ids["queued"]).exists()  # a known job is never stray
    store.close()


def test_a_download_that_found_its_job_survives_the_job_expiring(tmp_path, demo_home):
    """The record goes first, the folder a grace period later: a request between the two still gets its file."""
    state = make_state(tmp_path, "--keep-results-hours", "1")
    with TestClient(create_app(state)) as client:
        job_id = submit(client, {"prompt": "a hat"}).json()["id"]
        assert wait_finished(client, job_id)["status"] == "done"
        expected = client.get(f"/v1/edits/{job_id}/result").content
        real_get = state.store.get

        def found_then_expired(wanted):  # type: ignore[no-untyped-def]
            job = real_get(wanted)
            state.worker.retention.sweep(now=time.time() + 7200)  # the sweep lands right after the lookup
            return job

        state.store.get = found_then_expired
        response = client.get(f"/v1/edits/{job_id}/result")
        state.store.get = real_get
        assert response.status_code == 200 and response.content == expected
        assert client.get(f"/v1/edits/{job_id}/result").status_code == 404  # the record is gone


def test_a_finished_edit_is_deleted_after_the_retention_period(tmp_path, demo_home):
    state = make_state(tmp_path, "--keep-results-hours", "0.0005")  # 1.8 s
    state.worker.retention.every_s = state.worker.retention.grace_s = 0.1
    with TestClient(create_app(state)) as client:
        assert client.get("/v1/config").json()["limits"]["keep_results_hours"] == 0.0005
        job_id = submit(client, {"prompt": "a hat"}).json()["id"]
        assert wait_finished(client, job_id)["status"] == "done"
        assert client.get(f"/v1/edits/{job_id}/result").status_code == 200  # right after it finished
        deadline = time.monotonic() + 30
        while (gone := client.get(f"/v1/edits/{job_id}")).status_code == 200:
            assert time.monotonic() < deadline, "the finished job was not deleted"
            time.sleep(0.1)
        assert gone.status_code == 404 and "deletes edits 0.0005 hours after they finish" in gone.json()["detail"]
        assert client.get(f"/v1/edits/{job_id}/result").status_code == 404
        while (tmp_path / "results" / job_id).exists():  # the folder follows after the grace period
            assert time.monotonic() < deadline, "the finished job's folder was not deleted"
            time.sleep(0.1)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_retention_period_must_be_positive(tmp_path, value):
    with pytest.raises(ValueError, match="--keep-results-hours must be a positive number"):
        make_state(tmp_path, "--keep-results-hours", value)


# ---------------------------------------------------------------- server-wide flags


def test_the_servers_preset_keeps_its_trigger_around_an_enhanced_prompt(tmp_path, tiny_ckpt):
    from vlm_fakes import FakeOpenAIServer

    from chronoedit.presets import PRESETS

    dense = "The user wants to make it sharper; everything else stays as it is."
    from tiny_loras import attention_lora

    lora = attention_lora(tiny_ckpt, tmp_path / "my_upscale_lora.safetensors")
    fake = FakeOpenAIServer(lambda request: dense)
    try:
        flags = ["--model-path", str(tiny_ckpt), "--preset", "upscale", "--lora-path", str(lora),
                 "--prompt-enhancer-base-url", fake.url, "--prompt-enhancer-model", "m"]  # fmt: skip
        state = make_state(tmp_path / "state", *flags)
        with TestClient(create_app(state)) as client:
            plain, enhanced = (submit(client, {"prompt": "sharper", "seed": 1, **extra}).json()["id"]
                               for extra in ({}, {"enhance_prompt": True}))  # fmt: skip
            used = [wait_finished(client, job_id)["settings"]["prompt_used"] for job_id in (plain, enhanced)]
    finally:
        fake.close()
    assert used == [PRESETS["upscale"].prompt("sharper"), PRESETS["upscale"].prompt(dense)]


def test_a_bad_server_lora_fails_at_start_without_showing_its_folder(tmp_path):
    """The LoRA is a symlink into a blob store (a Hugging Face snapshot): neither folder is shown."""
    folder, blobs = tmp_path / "private-models", tmp_path / "blobs"
    folder.mkdir(), blobs.mkdir()
    (blobs / "3f9a2c").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    (folder / "house_style.safetensors").symlink_to(blobs / "3f9a2c")
    state = make_state(tmp_path / "state", "--lora-path", str(folder / "house_style.safetensors"))
    with TestClient(create_app(state)) as client:
        worker = wait_ready(client)["worker"]
        assert worker["state"] == "error" and "<loras>/house_style.safetensors" in worker["error"]
        refused = submit(client, {"prompt": "x"})
        assert refused.status_code == 503
        for text in (worker["error"], refused.text):
            assert str(folder) not in text and str(blobs) not in text and str(tmp_path) not in text


def test_the_servers_seed_applies_to_jobs_without_one(tmp_path, demo_home):
    with TestClient(create_app(make_state(tmp_path / "fixed", "--seed", "42"))) as client:
        assert client.get("/v1/config").json()["defaults"]["seed"] == 42
        assert submit(client, {"prompt": "x"}).json()["settings"]["seed"] == 42
        assert submit(client, {"prompt": "x", "seed": 7}).json()["settings"]["seed"] == 7
    with TestClient(create_app(make_state(tmp_path / "random"))) as client:
        assert client.get("/v1/config").json()["defaults"]["seed"] is None
        seeds = {submit(client, {"prompt": "x"}).json()["settings"]["seed"] for _ in range(3)}
        assert len(seeds) == 3


def test_default_steps_over_the_step_limit_fail_at_start(tmp_path, demo_home):
    with pytest.raises(ValueError, match=r"server's 2 denoising steps per job .* over --max-steps 1"):
        make_state(tmp_path, "--max-steps", "1")


def test_a_busy_port_is_one_error_line_before_anything_loads(tmp_path, capsys):
    import socket

    from chronoedit import cli

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        code = cli.main(["serve", "--port", str(port), "--state-dir", str(tmp_path / "state"), "--quiet"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("chronoedit: error:")]
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith(f"chronoedit: error: cannot listen on 127.0.0.1:{port}: "), err
    assert "Traceback" not in err  # a user error, not a bug
    assert not (tmp_path / "state").exists()  # nothing opened, nothing loaded


def test_stopping_while_the_model_loads_does_not_wait_for_it(tmp_path, demo_home):
    gate = threading.Event()
    state = make_state(tmp_path, load=fake_load(FakePipe(), gate))
    state.worker.start()
    started = time.monotonic()
    state.worker.stop()
    assert time.monotonic() - started < 5 and state.worker.alive  # the loading thread is left to the process's end
    gate.set()


def test_serve_offers_no_local_enhancer_flags(capsys):
    """serve runs the enhancer through an endpoint only: its help has no local-model device or dtype."""
    from chronoedit import cli

    assert cli.main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--prompt-enhancer-base-url" in text and "--prompt-enhancer-device" not in text
    assert "local model folder" not in text

"""``chronoedit serve`` under hostile conditions: a full disk, damaged queue rows, symbolic links in the results
folder, slow clients, odd encodings, absurd flags; every error one JSON line (or one CLI line), nothing lost."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

import httpx
from fastapi.testclient import TestClient
from serve_helpers import (
    FakePipe,
    fake_load,
    make_state,
    png_bytes,
    running_server,
    submit,
    wait_finished,
    wait_ready,
    workers_end_here,
)

from chronoedit import cli, media
from chronoedit.serve.app import create_app, job_file
from chronoedit.serve.store import JobStore


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
    with workers_end_here():
        yield


def fake_state(tmp_path: Path, *flags: str, pipe: FakePipe | None = None, gate: threading.Event | None = None) -> Any:
    """A server state whose worker runs a :class:`FakePipe` (no model: fast), loaded once ``gate`` is set."""
    state = make_state(tmp_path, *flags, load=fake_load(pipe or FakePipe(), gate))
    state.worker.poll_s = state.worker.retry_s = 0.05
    return state


def no_space(*_args, **_kwargs):  # type: ignore[no-untyped-def]
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def job_folders(state) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(p.name for p in state.results_dir.iterdir()) if state.results_dir.exists() else []


def cli_error(capsys, *argv: str) -> str:  # type: ignore[no-untyped-def]
    """Run ``chronoedit ARGV``: it must fail with exit code 2 and one error line, no traceback; that line."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("chronoedit: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------------------------------------- a full disk


def _fill_the_database(state) -> None:  # type: ignore[no-untyped-def]
    """The queue's database may not grow by a page: SQLite's own SQLITE_FULL on the next insert of any size."""
    db = state.store._db
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")


def _make_room(state) -> None:  # type: ignore[no-untyped-def]
    state.store._db.execute("PRAGMA max_page_count=1073741823")


@pytest.mark.parametrize("where", ["job folder", "input image", "queue row", "spooled upload"])
def test_a_full_disk_while_storing_an_upload_is_507_and_stores_nothing(tmp_path, monkeypatch, where):
    state = fake_state(tmp_path)
    real_mkdir = Path.mkdir

    def mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if path.parent == state.results_dir:
            no_space()
        return real_mkdir(path, *args, **kwargs)

    if where == "job folder":
        monkeypatch.setattr(Path, "mkdir", mkdir)
    elif where == "input image":
        monkeypatch.setattr(media, "save_image", no_space)
    elif where == "spooled upload":
        from starlette.datastructures import UploadFile

        monkeypatch.setattr(UploadFile, "write", lambda *args: no_space())
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        if where == "queue row":
            _fill_the_database(state)
        big = {"prompt": "a hat " * 660, "negative_prompt": "blurry " * 570, "seed": 1}  # over one database page
        refused = submit(client, big)
        assert refused.status_code == 507, refused.text
        detail = refused.json()["detail"]
        assert detail.startswith("the server's disk is full: ") and "\n" not in detail
        expected = {"job folder": "image cannot be stored", "input image": "image cannot be stored",
                    "queue row": "edit cannot be queued", "spooled upload": "upload cannot be received"}[where]
        assert expected in detail
        assert job_folders(state) == [] and state.store.ids() == set()  # nothing half-stored
        if where != "spooled upload":  # (the disk filled before the server wrote anything)
            assert client.get("/v1/health").json()["status"] == "degraded: disk full"
        monkeypatch.undo()  # space again
        _make_room(state)
        accepted = submit(client, {"prompt": "a hat", "seed": 1})
        assert accepted.status_code == 202, accepted.text
        assert wait_finished(client, accepted.json()["id"])["status"] == "done"
        assert client.get("/v1/health").json()["status"] == "ok"


def test_the_worker_survives_a_full_disk_and_runs_the_next_job_once_there_is_space(tmp_path, monkeypatch):
    """The job the disk fills under fails with the app layer's one line, what it wrote is deleted, health says why;
    the worker lives and runs the next job once there is space."""
    loaded = threading.Event()
    state = fake_state(tmp_path, gate=loaded)
    real_save = media.save_image
    full = threading.Event()
    full.set()

    def save_image(image, path):  # type: ignore[no-untyped-def]
        if full.is_set() and Path(path).name.startswith("result"):
            no_space()
        return real_save(image, path)

    monkeypatch.setattr(media, "save_image", save_image)
    with TestClient(create_app(state)) as client:
        first = submit(client, {"prompt": "a hat", "seed": 1}).json()["id"]  # queued while the model loads
        (state.results_dir / first / "trajectory.mp4").write_bytes(b"left by an earlier attempt")
        loaded.set()
        failed = wait_finished(client, first)
        assert failed["status"] == "failed"
        assert failed["error"] == f"cannot write <results>/{first}/result.png: the disk is full"
        health = client.get("/v1/health").json()
        assert health["status"] == "degraded: disk full" and health["worker"]["alive"]
        assert health["worker"]["disk_full"] is True and health["queue"]["running"] == 0
        assert sorted(p.name for p in (state.results_dir / first).iterdir()) == ["input.png"]
        full.clear()  # space again: the worker takes the next job
        second = submit(client, {"prompt": "a hat", "seed": 1}).json()["id"]
        assert wait_finished(client, second)["status"] == "done"
        health = client.get("/v1/health").json()
        assert health["status"] == "ok" and health["worker"]["disk_full"] is False
    assert set(health) == {"status", "version", "model", "worker", "queue"}  # the same shape as ever


def test_a_store_that_cannot_record_a_job_end_does_not_kill_the_worker(tmp_path, caplog):
    """The database full when the job is marked done: the worker keeps the outcome, tries again before the next
    job, and both jobs end up done."""
    state = fake_state(tmp_path)
    real_finish, refusals = state.store.finish, []

    def finish(*args):  # type: ignore[no-untyped-def]
        if len(refusals) < 3:
            refusals.append(args[0])
            raise sqlite3.OperationalError("database or disk is full")
        return real_finish(*args)

    state.store.finish = finish
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        first, second = (submit(client, {"prompt": p, "seed": 1}).json()["id"] for p in ("one", "two"))
        assert wait_finished(client, first)["status"] == "done"
        assert wait_finished(client, second)["status"] == "done"
        health = client.get("/v1/health").json()
    assert refusals == [first] * 3
    assert health["worker"]["alive"] and health["worker"]["state"] == "ready" and health["worker"]["jobs_run"] == 2
    assert "cannot record the end of job" in caplog.text


def test_a_job_end_never_recorded_is_run_again_after_a_restart(tmp_path):
    state = fake_state(tmp_path)
    state.store.finish = lambda *args: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error"))
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "a hat", "seed": 1}).json()["id"]
        deadline = time.monotonic() + 30
        while state.worker.jobs_run < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get(f"/v1/edits/{job}").json()["status"] == "running"
    assert not state.worker.alive and state.worker.state == "stopped"
    state.store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite3")
    assert reopened.requeued == 1 and reopened.get(job).status == "queued"
    reopened.close()


# ------------------------------------------------------------------------------------------ queue rows that do not read


def _hand_edit(db_path: Path, sql: str, *params: object) -> None:
    """Change the queue's database from another connection, as a person with sqlite3 would."""
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute(sql, params)
    finally:
        db.close()


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("options", "{not json", "options: Expecting property name"),
        ("files", "[1, 2]", "files: not a JSON object"),
        ("timings", "null", "timings: not a JSON object"),
        ("settings", b"\xff\xfe{", "settings: "),
        ("options", "[" * 100_000 + "]" * 100_000, "options: "),
    ],
)
def test_a_queue_row_that_cannot_be_read_is_failed_with_a_message(tmp_path, column, value, problem):
    state = fake_state(tmp_path)
    job = state.store.submit({"prompt": "x"}, 10, job_id="A" * 22)
    _hand_edit(state.store.path, f"UPDATE jobs SET {column}=? WHERE id=?", value, job.id)
    with TestClient(create_app(state)) as client:
        response = client.get(f"/v1/edits/{job.id}")
        assert response.status_code == 200, response.text
        shown = response.json()
        assert shown["status"] == "failed" and shown["finished"] is True
        assert shown["error"].startswith(f"stored job could not be read: {problem}") and "\n" not in shown["error"]
        health = client.get("/v1/health").json()
        assert health["queue"] == {"queued": 0, "running": 0, "limit": 100}
        assert client.get(f"/v1/edits/{job.id}").json()["error"] == shown["error"]  # stored so, and readable now


def test_claim_next_fails_unreadable_rows_and_takes_the_next(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    bad, good = (store.submit({"prompt": p}, 10).id for p in ("bad", "good"))
    _hand_edit(store.path, "UPDATE jobs SET options='{\"prompt\": ' WHERE id=?", bad)
    assert store.claim_next().id == good
    assert store.counts()["failed"] == 1 and store.counts()["running"] == 1
    failed = store.get(bad)
    assert failed.status == "failed" and failed.error.startswith("stored job could not be read: options: ")
    assert failed.options == {}  # the unreadable column is emptied
    assert store.claim_next() is None
    store.close()


def test_stored_options_that_are_not_valid_fail_the_job_not_the_worker(tmp_path):
    state = fake_state(tmp_path)
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        job = state.store.submit({"prompt": 5, "colour": "red"}, 10).id  # JSON, but not options
        state.worker.wake()
        failed = wait_finished(client, job)
        assert failed["status"] == "failed"
        assert failed["error"].startswith("stored job could not be read: options: prompt: ")
        ok = submit(client, {"prompt": "a hat", "seed": 1}).json()["id"]
        assert wait_finished(client, ok)["status"] == "done"


# -------------------------------------------------------------------------------------------------- symbolic links


def _finished_job(client) -> str:  # type: ignore[no-untyped-def]
    job = submit(client, {"prompt": "a hat", "seed": 1}).json()["id"]
    assert wait_finished(client, job)["status"] == "done"
    return job


def test_no_file_is_served_through_a_symbolic_link(tmp_path):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes((8, 8), (1, 2, 3)))
    state = fake_state(tmp_path / "state")
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        job = _finished_job(client)
        folder = state.results_dir / job
        assert client.get(f"/v1/edits/{job}/result").status_code == 200
        (folder / "result.png").unlink()
        (folder / "result.png").symlink_to(secret)
        (folder / "input.png").unlink()
        (folder / "input.png").symlink_to(os.path.relpath(secret, folder))
        for role in ("result", "input"):
            refused = client.get(f"/v1/edits/{job}/{role}")
            assert refused.status_code == 404 and refused.json()["detail"] == "this file is no longer on the server"

        other = _finished_job(client)  # its whole folder swapped for a link to a folder outside
        (secret.parent / "input.png").write_bytes(secret.read_bytes())
        os.rename(state.results_dir / other, tmp_path / "moved")
        (state.results_dir / other).symlink_to(secret.parent, target_is_directory=True)
        assert client.get(f"/v1/edits/{other}/input").status_code == 404

        third = _finished_job(client)  # a FIFO: refused without blocking
        (state.results_dir / third / "input.png").unlink()
        os.mkfifo(state.results_dir / third / "input.png")
        assert client.get(f"/v1/edits/{third}/input").status_code == 404

        fourth = _finished_job(client)  # a stored file name that climbs out of the folder
        _hand_edit(state.store.path, "UPDATE jobs SET files=? WHERE id=?",
                   json.dumps({"result": "../../outside/secret.png"}), fourth)  # fmt: skip
        assert client.get(f"/v1/edits/{fourth}/result").status_code == 404


def test_what_is_sent_is_the_file_that_was_opened(tmp_path):
    """The path swapped after the check: the answer is still the file opened then."""
    results = tmp_path / "results"
    (results / ("J" * 22)).mkdir(parents=True)
    path = results / ("J" * 22) / "result.png"
    path.write_bytes(b"the checked file")
    response = job_file(results, "J" * 22, "result.png")
    other = tmp_path / "other"
    other.write_bytes(b"something else entirely")
    os.replace(other, path)

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await response(scope, receive, send)

    assert TestClient(app).get("/").content == b"the checked file"  # (no lifespan: no "with")


# ------------------------------------------------------------------------------------------------------ slow clients


def _upload_scope(length: int) -> dict:
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", str(length).encode())]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/edits", "raw_path": b"/v1/edits", "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip


def _call(app, receive) -> tuple[list[dict], float]:  # type: ignore[no-untyped-def]
    """Run one request through the ASGI app; the messages it sent and how long it took."""
    sent: list[dict] = []

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    async def main() -> None:
        await asyncio.wait_for(app(_upload_scope(10_000), receive, send), 20)

    started = time.monotonic()
    asyncio.run(main())
    return sent, time.monotonic() - started


@pytest.mark.parametrize("client_kind", ["stalls", "trickles"])
def test_an_upload_that_stalls_or_trickles_is_answered_408(tmp_path, client_kind):
    app = create_app(fake_state(tmp_path, "--read-timeout", "0.4"))  # the worker is never started
    parts = 0

    async def receive() -> dict:
        nonlocal parts
        parts += 1
        if parts == 1:
            return {"type": "http.request", "body": b'--x\r\nContent-Disposition: form-data; name="options"\r\n\r\n',
                    "more_body": True}  # fmt: skip
        if client_kind == "stalls":
            await asyncio.Event().wait()  # never
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"{", "more_body": True}

    sent, took = _call(app, receive)
    start, body = sent[0], sent[1]
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    assert json.loads(body["body"])["detail"].startswith("the request arrived too slowly: this server waits 0.4 s")
    assert 0.3 < took < 5
    if client_kind == "trickles":
        assert parts > 3  # it kept sending: its pace, not a stall, got it dropped


def _read_answer(sock: socket.socket, timeout: float = 10) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (or ``timeout``); and whether it closed it."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    return data, True


def test_a_real_server_drops_clients_that_trickle_headers_or_stall_their_body(tmp_path):
    state = fake_state(tmp_path, "--read-timeout", "0.5")
    with running_server(create_app(state)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:  # headers a byte at a time, never finished
            started = time.monotonic()
            for byte in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ":
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.05)
                if time.monotonic() - started > 3:
                    break
            answer, closed = _read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and closed, answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"].startswith("the request arrived too slowly")
        assert time.monotonic() - started < 5

        with socket.create_connection((host, int(port))) as sock:  # a body that stops halfway
            sock.sendall(b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                         b"Content-Length: 5000\r\n\r\n--x\r\n")  # fmt: skip
            answer, closed = _read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and closed, answer
        assert b"application/json" in answer

        with socket.create_connection((host, int(port))) as sock:  # not HTTP at all: uvicorn's 400, in JSON
            sock.sendall(b"\x16\x03\x01 hello\r\n\r\n")
            answer, closed = _read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 400 ") and closed, answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"detail": "Invalid HTTP request received."}

        with httpx.Client(base_url=url) as http:  # a client at a normal pace is not affected
            assert http.get("/v1/health").status_code == 200


# ------------------------------------------------------------------------------------------------ errors as JSON


def test_every_error_answer_is_json(tmp_path):
    state = fake_state(tmp_path)
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        wait_ready(client)
        job = _finished_job(client)
        size = len(client.get(f"/v1/edits/{job}/result").content)
        ranged = client.get(f"/v1/edits/{job}/result", headers={"Range": "bytes=0-9"})
        assert ranged.status_code == 206 and len(ranged.content) == 10  # ranges still work
        answers = {
            "range past the end": client.get(f"/v1/edits/{job}/result", headers={"Range": f"bytes={size + 5}-"}),
            "range backwards": client.get(f"/v1/edits/{job}/result", headers={"Range": "bytes=5-2"}),
            "range in pages": client.get(f"/v1/edits/{job}/result", headers={"Range": "pages=1-2"}),
            "unknown route": client.get("/v2/whatever"),
            "wrong method": client.put("/v1/edits"),
            "no boundary": client.post("/v1/edits", content=b"x", headers={"content-type": "multipart/form-data"}),
            "not a form": client.post("/v1/edits", content=b"{}", headers={"content-type": "application/json"}),
            "static file": client.get("/static/nope.js"),
        }
        state.store.counts = lambda: 1 / 0  # a bug in a route
        answers["a bug"] = client.get("/v1/health")
        state.store.counts = lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked"))
        answers["queue unreadable"] = client.get("/v1/health")
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {"range past the end": 416, "range backwards": 400, "range in pages": 400,
                        "unknown route": 404, "wrong method": 405, "no boundary": 400, "not a form": 422,
                        "static file": 404, "a bug": 500, "queue unreadable": 503}  # fmt: skip
    for name, answer in answers.items():
        assert answer.headers["content-type"] == "application/json", name
        detail = answer.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail, name
    assert answers["range past the end"].headers["content-range"] == f"bytes */{size}"
    assert answers["a bug"].json()["detail"] == "internal error: see the server's log"
    assert answers["queue unreadable"].json()["detail"] == "the job queue cannot be read now: database is locked"


# ------------------------------------------------------------------------------------------------- tokens, encodings


def test_a_non_ascii_token_matches_a_utf8_client(tmp_path, monkeypatch):
    token = "sécret-ключ-🔑"
    monkeypatch.setenv("CHRONOEDIT_API_TOKEN", token)
    with TestClient(create_app(fake_state(tmp_path))) as client:
        wait_ready(client)
        right = {"Authorization": b"Bearer " + token.encode("utf-8")}
        assert submit(client, {"prompt": "x"}, headers=right).status_code == 202
        assert client.get("/v1/config", headers=right).status_code == 200
        latin1 = {"Authorization": b"Bearer s\xe9cret"}  # another token's bytes
        assert client.get("/v1/config", headers=latin1).status_code == 401
        assert client.get("/v1/config", headers={"Authorization": b"Bearer " + token[:-1].encode()}).status_code == 401


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("", "$CHRONOEDIT_API_TOKEN is set but holds no token: set a token, or unset it to run without one"),
        ("   ", "$CHRONOEDIT_API_TOKEN is set but holds no token: set a token, or unset it to run without one"),
        ("\t\n", "$CHRONOEDIT_API_TOKEN is set but holds no token: set a token, or unset it to run without one"),
        (" s3cret\n", "the token in $CHRONOEDIT_API_TOKEN starts or ends with whitespace, which no client can send"),
    ],
)
def test_a_token_no_client_can_send_is_refused_at_start(tmp_path, monkeypatch, capsys, token, expected):
    monkeypatch.setenv("CHRONOEDIT_API_TOKEN", token)
    line = cli_error(capsys, "serve", "--state-dir", str(tmp_path / "state"), "--port", "0", "--quiet")
    assert line == f"chronoedit: error: {expected}"
    assert not (tmp_path / "state" / "jobs.sqlite3").exists()


def test_options_must_be_utf8(tmp_path):
    with TestClient(create_app(fake_state(tmp_path))) as client:
        wait_ready(client)
        latin1 = submit(client, '{"prompt": "a caf\xe9 sign"}'.encode("latin-1"))  # type: ignore[arg-type]
        assert latin1.status_code == 422 and latin1.json() == {"detail": "options: not UTF-8 text"}
        utf8 = submit(client, '{"prompt": "a café sign", "seed": 1}'.encode())  # type: ignore[arg-type]
        assert utf8.status_code == 202, utf8.text
        assert utf8.json()["settings"]["prompt_used"] == "a café sign"
        wait_finished(client, utf8.json()["id"])


# ---------------------------------------------------------------------------------------------------- absurd flags


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
        (["--port", "-1"], "--port must be between 0 and 65535, got -1"),
        (["--max-upload-mb", "inf"], "--max-upload-mb must be a positive number, got inf"),
        (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive number, got nan"),
        (["--max-upload-mb", "-3"], "--max-upload-mb must be a positive number, got -3.0"),
        (["--max-upload-mb", "1e-9"], "--max-upload-mb 1e-09 is under one byte"),
        (["--keep-results-hours", "inf"], "--keep-results-hours must be a positive number, got inf"),
        (["--read-timeout", "0"], "--read-timeout must be a positive number, got 0.0"),
        (["--read-timeout", "nan"], "--read-timeout must be a positive number, got nan"),
        (["--max-queue", "0"], "--max-queue must be a positive number, got 0"),
        (["--max-steps", "-5"], "--max-steps must be a positive number, got -5"),
    ],
)
def test_absurd_numbers_are_one_line_before_anything_starts(tmp_path, capsys, flags, expected):
    line = cli_error(capsys, "serve", "--state-dir", str(tmp_path / "state"), "--quiet", *flags)
    assert line == f"chronoedit: error: {expected}"
    assert not (tmp_path / "state").exists()


def test_a_read_only_queue_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """SQLite's own read-only error (the database opened read-only: the tests run as root, whom file modes do not
    stop)."""
    db_path = tmp_path / "state" / "jobs.sqlite3"
    JobStore(db_path).close()
    connect = sqlite3.connect

    def read_only(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path) == db_path:
            return connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)
        return connect(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    line = cli_error(capsys, "serve", "--state-dir", str(tmp_path / "state"), "--port", "0", "--quiet")
    assert line == f"chronoedit: error: job database {db_path} cannot be used: attempt to write a readonly database"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_queue_file_is_one_line(tmp_path, capsys):
    db_path = tmp_path / "state" / "jobs.sqlite3"
    JobStore(db_path).close()
    db_path.chmod(0o444)
    line = cli_error(capsys, "serve", "--state-dir", str(tmp_path / "state"), "--port", "0", "--quiet")
    assert line.startswith(f"chronoedit: error: job database {db_path} cannot be used: ")


def test_a_state_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "state").write_text("not a folder")
    line = cli_error(capsys, "serve", "--state-dir", str(tmp_path / "state"), "--port", "0", "--quiet")
    assert line.startswith(f"chronoedit: error: cannot create the results folder {tmp_path / 'state' / 'results'}: ")


# ------------------------------------------------------------------------------------------- what the log and API show


def test_no_progress_bar_in_the_server_log(tmp_path, capfd):
    """The real (demo) pipeline through the server: its denoising bar never reaches the server's stderr."""
    state = make_state(tmp_path)
    with TestClient(create_app(state)) as client:
        wait_ready(client)
        capfd.readouterr()
        job = submit(client, {"prompt": "a hat", "seed": 1, "num_inference_steps": 3}).json()["id"]
        assert wait_finished(client, job)["status"] == "done"
    out, err = capfd.readouterr()
    for text in (out, err):
        assert not any(mark in text for mark in ("it/s", "step/s", "s/step", "%|", "denoising")), text


def test_the_stage_says_decoding_while_the_vae_decodes(tmp_path):
    resume = threading.Event()
    pipe = FakePipe(hold_decode=resume)
    state = fake_state(tmp_path, pipe=pipe)
    try:
        with TestClient(create_app(state)) as client:
            wait_ready(client)
            job = submit(client, {"prompt": "a hat", "seed": 1}).json()["id"]
            assert pipe.decoding.wait(30)
            running = client.get(f"/v1/edits/{job}").json()
            resume.set()
            done = wait_finished(client, job)
    finally:
        resume.set()
    assert running["status"] == "running" and running["progress"] == {"step": 2, "total": 2, "stage": "decoding"}
    assert done["status"] == "done" and done["progress"]["stage"] is None

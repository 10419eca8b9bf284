"""``chronoedit serve``: an HTTP API with a persistent job queue, and a web UI, over one loaded pipeline.

- :mod:`.options`: what a client may ask (a closed set) and the server's limits
- :mod:`.store`: the SQLite job queue (survives restarts; running jobs are re-queued)
- :mod:`.editing`: upload + options -> a validated edit job, through ``chronoedit edit``'s own validation
- :mod:`.worker`: the thread that owns the model and runs jobs in order
- :mod:`.pool`, :mod:`.child`: ``--devices``: a worker process per device over the same queue, supervised
- :mod:`.guards`: limits on a request's pace and size, UTF-8 form fields, JSON for every error
- :mod:`.app`: the FastAPI routes and the static web UI (``static/``)

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart).
"""

"""Imports the API starts: each runs on its own thread while clients read its progress.

At most ``MAX_RUNNING`` run at once and one per profile name; the newest ``KEEP`` finished
ones stay readable. The API reads only http(s):// URLs and paths under
``[imports] api_local_roots``: an API client must not make the server read (and then publish
over TFTP) whatever files of its own disk happen to look like an installer.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pxeserver.app import Context
from pxeserver.imports import IMPORT_ERRORS, ImportResult, run_import
from pxeserver.imports.layouts import ARCHES
from pxeserver.imports.progress import JobProgress
from pxeserver.registry import Conflict, NotFound, ValidationError
from pxeserver.registry.models import validate_profile_name, validate_template_name

log = logging.getLogger(__name__)

MAX_RUNNING = 2
KEEP = 50
MAX_SOURCE_LENGTH = 2048


@dataclass
class Job:
    id: str
    name: str
    source: str
    arch: str
    autoinstall: str
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    result: ImportResult | None = None
    progress: JobProgress = field(default_factory=JobProgress)

    @property
    def state(self) -> str:
        if self.finished is None:
            return "running"
        return "failed" if self.error is not None else "done"

    def to_dict(self, secret_vars: list[str]) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "source": self.source, "arch": self.arch,
                "state": self.state, "started": self.started, "finished": self.finished,
                "error": self.error, **self.progress.snapshot(),
                "result": self.result.to_dict(secret_vars) if self.result else None}


class ImportJobs:
    def __init__(self, context: Context) -> None:
        self.context = context
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def start(self, data: Any) -> Job:
        job = self._checked(data)
        with self._lock:
            running = [j for j in self._jobs.values() if j.state == "running"]
            if any(j.name == job.name for j in running):
                raise Conflict(f"an import of {job.name!r} is already running")
            if len(running) >= MAX_RUNNING:
                raise Conflict(f"{len(running)} imports are already running; try again when one ends")
            self._jobs[job.id] = job
            finished = [j.id for j in self._jobs.values() if j.state != "running"]
            for old in finished[:max(0, len(self._jobs) - KEEP)]:
                del self._jobs[old]
        threading.Thread(target=self._run, args=(job,), name=f"import-{job.name}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no import {job_id!r}")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def _checked(self, data: Any) -> Job:
        if not isinstance(data, dict):
            raise ValidationError("an import must be a JSON object")
        unknown = sorted(set(data) - {"name", "source", "arch", "autoinstall"})
        if unknown:
            raise ValidationError(f"unknown import field(s): {', '.join(unknown)}")
        values: dict[str, str] = {}
        for key, default in (("name", None), ("source", None), ("arch", "x86_64"), ("autoinstall", "")):
            value = data.get(key, default)
            if not isinstance(value, str):
                raise ValidationError(f"{key} is required and must be a string")
            values[key] = value
        validate_profile_name(values["name"])
        if values["arch"] not in ARCHES:
            raise ValidationError(f"arch must be one of {', '.join(ARCHES)}")
        if values["autoinstall"]:
            validate_template_name(values["autoinstall"])
        self._check_source(values["source"])
        return Job(secrets.token_hex(8), values["name"], values["source"], values["arch"], values["autoinstall"])

    def _check_source(self, source: str) -> None:
        if not source or len(source) > MAX_SOURCE_LENGTH or not source.isprintable():
            raise ValidationError(f"source must be a URL or path of 1 to {MAX_SOURCE_LENGTH} printable characters")
        if urllib.parse.urlsplit(source).scheme.lower() in ("http", "https"):
            return
        real = os.path.realpath(source)
        for root in self.context.config.imports.api_local_roots:
            real_root = os.path.realpath(root)
            if os.path.isabs(source) and os.path.commonpath([real_root, real]) == real_root:
                return
        raise ValidationError("source must be an http:// or https:// URL, or a path under "
                              "[imports] api_local_roots")

    def _run(self, job: Job) -> None:
        try:
            job.result = run_import(self.context, job.name, job.source, job.progress,
                                    arch=job.arch, autoinstall=job.autoinstall)
        except (*IMPORT_ERRORS, ValidationError, Conflict, NotFound) as exc:
            job.error = str(exc)
        except Exception as exc:  # the job reports it; the server goes on
            log.exception("import %s from %s failed", job.name, job.source)
            job.error = f"internal error: {exc}"
        finally:
            job.finished = time.time()
            self.context.store.close()  # this thread's connection

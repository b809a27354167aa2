"""The fine-tuning worker: claims queued jobs from the registry database and runs each one as
`loraplex train ... --register` in a subprocess (the server never imports the trainer).

For a job: fetch its files into a run folder, validate them (problems fail the job with their
line numbers), train, turn the run folder's checkpoints (trainer_state.json's log) into metrics
events and checkpoint records, and on success record the registered `NAME@V` as the job's
`fine_tuned_model`. A cancel asked for over HTTP reaches the worker with its heartbeat: the
training's process group gets SIGTERM, then SIGKILL; registration is the run's last step, so a
stopped run registers nothing.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from registry.fine_tuning import FineTuningStore, new_id
from registry.fine_tuning_tables import JobRow
from registry.service import Registry
from server.fine_tuning import files

log = logging.getLogger(__name__)
BASE_LR = 2e-4  # the trainer's SFT default; learning_rate_multiplier scales it
STOP_GRACE_S = 5.0
TAIL_CHARS = 2000
PR_SET_PDEATHSIG = 1


class Worker:
    """One job at a time; `run_once` for tests and loops, `start`/`stop` for a thread."""

    def __init__(
        self, registry: Registry, *, registry_url: str, artifacts_url: str, model_dir: Path,
        runs_dir: Path, gate: bool = True, poll_seconds: float = 1.0, name: str | None = None,
    ) -> None:  # fmt: skip
        self.registry, self.jobs = registry, FineTuningStore(registry.store)
        self.registry_url, self.artifacts_url = registry_url, artifacts_url
        self.model_dir, self.runs_dir, self.gate = model_dir, runs_dir, gate
        self.poll_seconds = poll_seconds
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{new_id('w')[2:10]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="fine-tuning", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # the database went away for a moment: try again later
                log.exception("fine-tuning worker")
                worked = False
            if not worked:
                self._stop.wait(self.poll_seconds)

    def run_once(self) -> bool:
        """Claim one job and run it to its end; False when the queue is empty."""
        job = self.jobs.claim(self.name)
        if job is None:
            return False
        try:
            self._run(job)
        except Exception as e:
            log.exception("fine-tuning job %s", job.id)
            self._fail(job, "internal_error", f"the worker failed: {type(e).__name__}: {e}")
        return True

    def _fail(self, job: JobRow, code: str, message: str, param: str | None = None) -> None:
        error = {"code": code, "message": message, "param": param}
        self.jobs.set_status(job.id, "failed", error=error, level="error", message=message)

    def _run(self, job: JobRow) -> None:
        run_dir = self.runs_dir / job.id
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        data = self._fetch(job.training_file, run_dir / "training")
        val = (
            self._fetch(job.validation_file, run_dir / "validation")
            if job.validation_file
            else None
        )
        for path, param in ((data, "training_file"), (val, "validation_file")):
            if path is None:
                continue
            checked = files.validate_file(path, val=val if path is data else None)
            if not checked.ok:
                file_id = getattr(job, param)
                return self._fail(
                    job, f"invalid_{param}", f"{param} {file_id} has problems:\n{checked.details}",
                    param,
                )  # fmt: skip
        self.jobs.set_status(
            job.id, "queued", message="Files validated, moving job to queued state"
        )
        self.jobs.set_status(job.id, "running", message="Fine-tuning job started")
        self._train(job, data, val, run_dir)

    def _fetch(self, file_id: str, dest: Path) -> Path:
        row = self.jobs.get_file(file_id)
        return files.fetch_file(self.registry.artifacts, row.blob_sha256, dest)

    def _command(self, job: JobRow, data: Path, val: Path | None, out: Path) -> list[str]:
        hyper = job.method["supervised"]["hyperparameters"]
        command = [
            sys.executable, "-m", "loraplex.cli", "train", "--data", str(data),
            "--name", job.suffix, "--out", str(out), "--model", str(self.model_dir),
            "--seed", str(job.seed), "--register", "--gate" if self.gate else "--no-gate",
            "--registry", self.registry_url, "--artifacts", self.artifacts_url,
            "--actor", f"fine-tuning:{job.id}", "--tag", f"fine_tuning_job={job.id}",
            "--tag", f"training_file={job.training_file}", "--json",
        ]  # fmt: skip
        if val is not None:
            command += ["--val", str(val), "--tag", f"validation_file={job.validation_file}"]
        if hyper.get("n_epochs", "auto") != "auto":
            command += ["--epochs", str(hyper["n_epochs"])]
        if hyper.get("batch_size", "auto") != "auto":
            command += ["--batch-size", str(hyper["batch_size"])]
        if hyper.get("learning_rate_multiplier", "auto") != "auto":
            command += ["--lr", repr(BASE_LR * hyper["learning_rate_multiplier"])]
        return command

    def _train(self, job: JobRow, data: Path, val: Path | None, run_dir: Path) -> None:
        out = run_dir / "run"
        log_path = run_dir / "train.log"
        with log_path.open("wb") as stderr:
            process = subprocess.Popen(
                self._command(job, data, val, out), stdout=subprocess.PIPE, stderr=stderr,
                start_new_session=True,  # its own process group: a cancel stops the gate too
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            progress = _Progress(self.jobs, job.id, out)
            stdout = _drain(process)
            cancelled = False
            while process.poll() is None:
                progress.read()
                if self._stop.is_set():  # the worker is shutting down: the job waits for another
                    _stop(process)
                    self.jobs.set_status(job.id, "queued", worker=None,
                                         message="The worker stopped; the job is queued again")  # fmt: skip
                    return
                if self.jobs.heartbeat(job.id, self.name) and not cancelled:
                    cancelled = True
                    _stop(process)
                time.sleep(0.5)
        progress.read()
        if self.jobs.get_job(job.id).worker != self.name:
            log.warning("fine-tuning job %s was given to another worker; stopped it here", job.id)
            return
        if cancelled and process.returncode != 0:
            self.jobs.set_status(job.id, "cancelled", message="Training stopped")
            return
        if process.returncode != 0:
            return self._fail(job, "training_failed", f"loraplex train failed: {_reason(log_path)}")
        result = json.loads(stdout.result())
        metrics = json.loads(Path(result["metrics"]).read_text(encoding="utf-8"))
        ref = result["version"]["ref"]
        self.jobs.set_status(
            job.id, "succeeded", fine_tuned_model=ref, trained_tokens=metrics.get("tokens_trained"),
            message=f"The job has successfully completed: {ref}",
        )  # fmt: skip


def _die_with_parent() -> None:
    """In the training process (Linux): a worker that dies takes its training with it, so a
    job taken over by another worker is never registered twice."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _reason(log_path: Path) -> str:
    """The log's own error lines (`error: ...`, an exception's last line), not a traceback."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if not errors:
        errors = [line for line in lines if not line[:1].isspace()][-1:]
    return " ".join(errors)[-TAIL_CHARS:] or "no output"


class _Progress:
    """Metrics events for each logged step and a checkpoint record for each saved checkpoint,
    read from the run folder (checkpoints/checkpoint-N/trainer_state.json, metrics.json)."""

    def __init__(self, jobs: FineTuningStore, job_id: str, out: Path) -> None:
        self.jobs, self.job_id, self.out = jobs, job_id, out
        self.steps: set[int] = set()
        self.checkpoints: set[int] = set()

    def read(self) -> None:
        for state_path in sorted(
            (self.out / "checkpoints").glob("checkpoint-*/trainer_state.json")
        ):
            try:
                state = json.loads(state_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # being written: read it next time
            self._log(state)
            step = int(state.get("global_step", 0))
            if step and step not in self.checkpoints:
                self.checkpoints.add(step)
                self.jobs.add_checkpoint(self.job_id, step, self._checkpoint_metrics(state, step))

    def _log(self, state: dict[str, Any]) -> None:
        total = state.get("max_steps")
        for entry in state.get("log_history", []):
            step = entry.get("step")
            if "loss" not in entry or step is None or step in self.steps:
                continue
            self.steps.add(step)
            data = {"step": step, "train_loss": entry["loss"], "total_steps": total}
            self.jobs.add_event(
                self.job_id, f"Step {step}/{total}: training loss={entry['loss']:.4f}",
                type="metrics", data=data,
            )  # fmt: skip

    @staticmethod
    def _checkpoint_metrics(state: dict[str, Any], step: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"step": step}
        for entry in state.get("log_history", []):
            if entry.get("step") == step and "loss" in entry:
                metrics["train_loss"] = entry["loss"]
            if entry.get("step") == step and "eval_loss" in entry:
                metrics["valid_loss"] = metrics["full_valid_loss"] = entry["eval_loss"]
        return metrics


class _Output:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done = threading.Event()

    def result(self) -> str:
        self.done.wait()
        return b"".join(self.chunks).decode("utf-8", "replace")


def _drain(process: subprocess.Popen) -> _Output:
    """Read the process's stdout in a thread (a full pipe would stall it)."""
    output = _Output()

    def read() -> None:
        output.chunks.append(process.stdout.read())
        output.done.set()

    threading.Thread(target=read, daemon=True).start()
    return output


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after STOP_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def worker_for(registry: Registry, settings: Any, *, model_dir: Path | None = None) -> Worker:
    """A worker on `registry` (its own database and artifact store URLs go to the trainer)."""
    return Worker(
        registry,
        registry_url=registry.store.engine.url.render_as_string(hide_password=False),
        artifacts_url=registry.artifacts.url,
        model_dir=model_dir or registry.base.folder or settings.base_model_folder(),
        runs_dir=settings.data_dir() / "fine_tuning" / "runs",
        gate=settings.fine_tuning_gate,
        poll_seconds=settings.fine_tuning_poll_seconds,
    )


def in_process_worker(registry: Registry | None, settings: Any) -> Worker | None:
    """The worker `loraplex serve` runs: when enabled, on a registry whose base model folder is
    here (the folder the trainer needs)."""
    if registry is None or not settings.fine_tuning_worker:
        return None
    folder = registry.base.folder
    if folder is None or not (folder / "config.json").is_file():
        log.warning("no fine-tuning worker in this server: no base model folder to train on")
        return None
    return worker_for(registry, settings, model_dir=folder)

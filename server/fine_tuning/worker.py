"""The fine-tuning worker: claims queued jobs from the registry database and runs each one as
`loraplex train ... --register` in a subprocess (the server never imports the trainer).

For a job: fetch its files into a run folder, validate them (problems fail the job with their
line numbers), train, turn the training's event file (`--events`: one JSON object a line, as it
happens) into metrics and message events, upload each new checkpoint (the run record and the
checkpoint folder, content-addressed in the artifact store) and record it as the job's newest,
and on success record the registered `NAME@V` as the job's `fine_tuned_model`. A worker that
takes over a job whose worker fell silent, or continues a paused one, fetches that checkpoint
and the same files and runs `loraplex train --resume`. A cancel or a pause asked for over HTTP
reaches the worker with its heartbeat: the training's process group gets SIGTERM, then SIGKILL;
registration is the run's last step, so a stopped run registers nothing.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from registry.fine_tuning import (
    CHECKPOINT_FOLDER,
    STALE_SECONDS,
    FineTuningStore,
    fine_tuned_model_id,
    new_id,
)
from registry.fine_tuning_tables import JobRow
from registry.service import Registry
from server.fine_tuning import files

log = logging.getLogger(__name__)
BASE_LR = {"supervised": 2e-4, "dpo": 5e-5}  # the trainer's defaults, scaled by the multiplier
STOP_GRACE_S = 5.0
TAIL_CHARS = 2000
PR_SET_PDEATHSIG = 1
RUN_RECORD, CHECKPOINTS, CHECKPOINT_PREFIX = "run.json", "checkpoints", "checkpoint-"
TRAINER_STATE = "trainer_state.json"
RESULTS_PURPOSE = "fine-tune-results"
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
_TRAIN_FLAGS: set[str] = set()  # `loraplex train --help`'s flags, read once


class Worker:
    """One job at a time; `run_once` for tests and loops, `start`/`stop` for a thread."""

    def __init__(
        self, registry: Registry, *, registry_url: str, artifacts_url: str, model_dir: Path,
        runs_dir: Path, gate: bool = True, poll_seconds: float = 1.0, name: str | None = None,
        stale_seconds: float = STALE_SECONDS,
    ) -> None:  # fmt: skip
        self.registry, self.jobs = registry, FineTuningStore(registry.store)
        self.registry_url, self.artifacts_url = registry_url, artifacts_url
        self.model_dir, self.runs_dir, self.gate = model_dir, runs_dir, gate
        self.poll_seconds, self.stale_seconds = poll_seconds, stale_seconds
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
        job = self.jobs.claim(self.name, stale_seconds=self.stale_seconds)
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
        resume = job.checkpoint_sha256 is not None
        if resume:  # the run record and newest checkpoint another worker (or a pause) left
            self.registry.artifacts.fetch(job.checkpoint_sha256, run_dir / "run")
            message = f"Fine-tuning job resumed from the checkpoint at step {job.checkpoint_step}"
        else:
            message = "Fine-tuning job started"
        self.jobs.set_status(job.id, "running", message=message)
        self._train(job, data, val, run_dir, resume=resume)

    def _fetch(self, file_id: str, dest: Path) -> Path:
        row = self.jobs.get_file(file_id)
        return files.fetch_file(self.registry.artifacts, row.blob_sha256, dest)

    def _command(
        self, job: JobRow, data: Path, val: Path | None, out: Path, *, events: Path | None,
        resume: bool,
    ) -> list[str]:  # fmt: skip
        kind = job.method["type"]
        hyper = job.method[kind]["hyperparameters"]
        command = [
            sys.executable, "-m", "loraplex.cli", "train", "--data", str(data),
            "--name", job.suffix, "--out", str(out), "--model", str(self.model_dir),
            "--seed", str(job.seed), "--register", "--gate" if self.gate else "--no-gate",
            "--registry", self.registry_url, "--artifacts", self.artifacts_url,
            "--actor", f"fine-tuning:{job.id}", "--tag", f"fine_tuning_job={job.id}",
            "--tag", f"training_file={job.training_file}", "--json",
        ]  # fmt: skip
        source = {"fine_tuning_job": job.id, "model": job.model}
        for param in ("training_file", "validation_file"):
            file_id = getattr(job, param)
            if file_id is not None:
                source |= {param: file_id, f"{param}_sha256": self.jobs.get_file(file_id).sha256}
                command += ["--tag", f"{param}_sha256={source[f'{param}_sha256']}"]
        if "--source" in _train_flags():  # the job and its files, in the version's lineage
            command += [
                arg for key, value in source.items() for arg in ("--source", f"{key}={value}")
            ]
        if val is not None:
            command += ["--val", str(val), "--tag", f"validation_file={job.validation_file}"]
        if kind == "dpo":
            command += ["--method", "dpo"]
            if hyper.get("beta", "auto") != "auto":
                command += ["--beta", repr(float(hyper["beta"]))]
        if job.from_ref is not None:
            command += ["--from", job.from_ref, "--tag", f"from={job.from_ref}"]
        if events is not None:
            command += ["--events", str(events)]
        if resume:
            command.append("--resume")
        if hyper.get("n_epochs", "auto") != "auto":
            command += ["--epochs", str(hyper["n_epochs"])]
        if hyper.get("batch_size", "auto") != "auto":
            command += ["--batch-size", str(hyper["batch_size"])]
        if hyper.get("learning_rate_multiplier", "auto") != "auto":
            command += ["--lr", repr(BASE_LR[kind] * hyper["learning_rate_multiplier"])]
        return command

    def _train(
        self, job: JobRow, data: Path, val: Path | None, run_dir: Path, *, resume: bool
    ) -> None:
        out = run_dir / "run"
        log_path = run_dir / "train.log"
        events = run_dir / "events.jsonl" if "--events" in _train_flags() else None
        command = self._command(job, data, val, out, events=events, resume=resume)
        progress = _Progress(self.jobs, self.registry.artifacts, job, out, events)
        with log_path.open("wb") as stderr:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr,
                start_new_session=True,  # its own process group: a cancel stops the gate too
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            stdout = _drain(process)
            stopped = False
            while process.poll() is None:
                progress.read()
                if self._stop.is_set():  # the worker is shutting down: the job waits for another
                    _stop(process)
                    progress.read(final=True)
                    self.jobs.set_status(job.id, "queued", worker=None,
                                         message="The worker stopped; the job is queued again")  # fmt: skip
                    return
                if self.jobs.heartbeat(job.id, self.name) and not stopped:
                    stopped = True
                    _stop(process)
                time.sleep(0.5)
        progress.read(final=True)
        now = self.jobs.get_job(job.id)
        if now.worker != self.name:
            log.warning("fine-tuning job %s was given to another worker; stopped it here", job.id)
            return
        if stopped and process.returncode != 0:
            if now.cancel_requested:
                self.jobs.set_status(job.id, "cancelled", message="Training stopped")
            else:
                at = f" at step {now.checkpoint_step}" if now.checkpoint_step else ""
                self.jobs.set_status(
                    job.id, "paused", worker=None, pause_requested=False,
                    message=f"Fine-tuning job paused; it resumes from the checkpoint{at}"
                    if at else "Fine-tuning job paused before its first checkpoint",
                )  # fmt: skip
            return
        if process.returncode != 0:
            return self._fail(job, "training_failed", f"loraplex train failed: {_reason(log_path)}")
        result = json.loads(stdout.result())
        metrics = json.loads(Path(result["metrics"]).read_text(encoding="utf-8"))
        ref, model = result["version"]["ref"], fine_tuned_model_id(job)
        data = results_csv(metrics)
        sha256, blob = files.store_bytes(self.registry.artifacts, data)
        results = self.jobs.add_file(
            filename="step_metrics.csv", purpose=RESULTS_PURPOSE, bytes=len(data), sha256=sha256,
            blob_sha256=blob, status="processed",
        )  # fmt: skip
        self.jobs.set_status(
            job.id, "succeeded", fine_tuned_model=model, result_ref=ref,
            trained_tokens=metrics.get("tokens_trained"), result_files=[results.id],
            message=f"The job has successfully completed: {model} ({ref})",
        )  # fmt: skip


def results_csv(metrics: dict[str, Any]) -> bytes:
    """The result file as OpenAI shapes it: one row a logged step; the validation figures at
    the steps evaluated; token accuracies where the training logs them (SFT, not DPO)."""
    valid = {e["step"]: e for e in metrics.get("eval_loss", [])}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for entry in metrics.get("train_loss", []):
        evaluated = valid.get(entry["step"], {})
        row = (entry["step"], entry["loss"], entry.get("accuracy"), evaluated.get("loss"),
               evaluated.get("accuracy"))  # fmt: skip
        writer.writerow(["" if value is None else value for value in row])
    return out.getvalue().encode()


def _train_flags() -> set[str]:
    """The flags `loraplex train` takes (this loraplex's trainer, asked once)."""
    if not _TRAIN_FLAGS:
        done = subprocess.run(
            [sys.executable, "-m", "loraplex.cli", "train", "--help"], capture_output=True,
            text=True, timeout=120, env=os.environ | {"COLUMNS": "200", "NO_COLOR": "1"},
        )  # fmt: skip
        _TRAIN_FLAGS.update(w.strip(",") for w in done.stdout.split() if w.startswith("--"))
    return _TRAIN_FLAGS


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
    """The job's events and checkpoints, from its run: each line of the training's event file
    (`train`, `eval` -> metrics events, one per step with its validation loss when evaluated;
    `start`, `checkpoint`, `done` -> messages), or without one the checkpoints' logs; each new
    complete checkpoint uploaded and recorded as the job's newest."""

    def __init__(
        self, jobs: FineTuningStore, artifacts: Any, job: JobRow, out: Path, events: Path | None
    ) -> None:
        self.jobs, self.artifacts, self.job_id, self.out = jobs, artifacts, job.id, out
        self.events, self.offset, self.pending = events, 0, None  # a step's train event, held
        resumed = job.checkpoint_step or 0
        self.steps: set[int] = set(range(resumed + 1))  # steps already reported
        self.uploaded = resumed

    def read(self, *, final: bool = False) -> None:
        if self.events is not None:
            for event in self._new_lines():
                self._on_event(event)
            if final:
                self._flush()
        self._checkpoints()

    def _new_lines(self) -> list[dict[str, Any]]:
        try:
            with self.events.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for next time
        self.offset += len(complete)
        found = []
        for line in complete.splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                log.warning("fine-tuning job %s: unreadable event line %r", self.job_id, line)
        return found

    def _on_event(self, event: dict[str, Any]) -> None:
        kind, step, total = event.get("event"), event.get("step"), event.get("max_steps")
        if kind == "train" and step is not None and "loss" in event:
            self._flush()
            self.pending = {"step": step, "train_loss": event["loss"], "total_steps": total,
                            "epoch": event.get("epoch"),
                            "learning_rate": event.get("learning_rate"),
                            "train_mean_token_accuracy": event.get("accuracy")}  # fmt: skip
            return
        if kind == "eval" and "eval_loss" in event:
            if self.pending is not None and self.pending["step"] == step:
                accuracy = event.get("eval_accuracy")
                self.pending |= {"valid_loss": event["eval_loss"],
                                 "full_valid_loss": event["eval_loss"],
                                 "valid_mean_token_accuracy": accuracy,
                                 "full_valid_mean_token_accuracy": accuracy}  # fmt: skip
            return
        self._flush()
        if kind == "start":
            at = f"resumed at step {step}" if step else "started"
            self.jobs.add_event(self.job_id, f"Training {at} ({total} steps)", data=event)
        elif kind == "checkpoint":
            self.jobs.add_event(self.job_id, f"Checkpoint saved at step {step}", data=event)
        elif kind == "done":
            self.jobs.add_event(self.job_id, f"Training done: {step} steps", data=event)

    def _flush(self) -> None:
        data, self.pending = self.pending, None
        if data is None or data["step"] in self.steps:
            return
        self.steps.add(data["step"])
        self._metrics(data)

    def _metrics(self, data: dict[str, Any]) -> None:
        data = {k: v for k, v in data.items() if v is not None}
        message = (
            f"Step {data['step']}/{data.get('total_steps')}: training loss={data['train_loss']:.4f}"
        )
        if "valid_loss" in data:
            message += f", validation loss={data['valid_loss']:.4f}"
        self.jobs.add_event(self.job_id, message, type="metrics", data=data)

    def _checkpoints(self) -> None:
        complete = sorted(
            (int(path.parent.name.removeprefix(CHECKPOINT_PREFIX)), path.parent)
            for path in (self.out / CHECKPOINTS).glob(f"{CHECKPOINT_PREFIX}*/{TRAINER_STATE}")
            if path.parent.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
        )
        for step, folder in complete:
            if step <= self.uploaded:
                continue
            try:
                state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
                if self.events is None:
                    self._log(state)
                blob = self._upload(folder, step)
            except (OSError, ValueError) as e:  # being written or rotated: next time
                log.info("fine-tuning job %s: checkpoint %s not read yet: %s", self.job_id, step, e)
                continue
            self.uploaded = step
            self.jobs.add_checkpoint(
                self.job_id, step, self._checkpoint_metrics(state, step), blob_sha256=blob
            )

    def _upload(self, checkpoint: Path, step: int) -> str:
        """The run record and `checkpoint`, as the run folder holds them (CHECKPOINT_FOLDER: the
        layout `--resume` reads and the server serves the adapter from), into the artifact
        store; the blob's sha256."""
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.out.parent))
        try:
            shutil.copy2(self.out / RUN_RECORD, staging / RUN_RECORD)
            shutil.copytree(checkpoint, staging / CHECKPOINT_FOLDER.format(step=step))
            return self.artifacts.upload_folder(staging).sha256
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _log(self, state: dict[str, Any]) -> None:
        total = state.get("max_steps")
        for entry in state.get("log_history", []):
            step = entry.get("step")
            if "loss" not in entry or step is None or step in self.steps:
                continue
            self.steps.add(step)
            self._metrics({"step": step, "train_loss": entry["loss"], "total_steps": total})

    @staticmethod
    def _checkpoint_metrics(state: dict[str, Any], step: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"step": step}
        for entry in state.get("log_history", []):
            if entry.get("step") != step:
                continue
            if "loss" in entry:
                metrics["train_loss"] = entry["loss"]
                if entry.get("mean_token_accuracy") is not None:
                    metrics["train_mean_token_accuracy"] = entry["mean_token_accuracy"]
            if "eval_loss" in entry:
                metrics["valid_loss"] = metrics["full_valid_loss"] = entry["eval_loss"]
                if entry.get("eval_mean_token_accuracy") is not None:
                    accuracy = entry["eval_mean_token_accuracy"]
                    metrics["valid_mean_token_accuracy"] = accuracy
                    metrics["full_valid_mean_token_accuracy"] = accuracy
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
        stale_seconds=settings.fine_tuning_stale_seconds,
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

"""MLflow tracking, local first.

One :class:`StageRun` per stage execution. Every call (params, metrics, artifacts, tags, the end
status) is first appended to a local journal (``.pipeline/tracking/<id>/journal.jsonl`` under the
project root) and then handed to a background thread that sends it to MLflow. The stage never
waits on the network on its hot path, and a tracking failure never fails a stage:

* MLflow not installed, or the server down at start: the run is journaled locally only.
* The server goes away midway: the sender notes how far it got, copies the artifacts into the
  journal, and stops trying (so training goes on at full speed).
* ``python -m pipeline mlflow-sync`` later replays every journal that is not fully sent, and ends
  runs whose process died without ending them (kill -9, OOM, power loss) as KILLED.

Bounds: the training loop only appends a journal line and puts the event on a queue, so a dead or
hung server costs it nothing. The sender tries an event three times against a SQLite store
("database is locked" under parallel experiments); over HTTP, MLflow's client retries on its own,
capped here at a 10 s timeout and 2 retries.
At the end of a stage the process waits at most ``PIPELINE_TRACKING_FLUSH_S`` seconds (default
60; 10 when the stage was killed, so a scheduler's grace period is not exceeded) for the sender,
then copies whatever was not sent into the journal and exits; ``mlflow-sync`` finishes the job.
A running stage holds a lock on its journal, so ``mlflow-sync`` never replays (or marks KILLED)
a run that is still going.

Runs are grouped: every stage run of one ``dvc repro`` (or ``dvc exp run``) is a child of one
parent run, found through a group key (``PIPELINE_RUN_GROUP`` if set, else the pid and start time
of the dvc process that started the stage). The default store is a SQLite database at the project
root (``mlruns.db``), whatever directory DVC runs the stage in, with artifacts in
``mlartifacts/``; ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .io import project_root, try_flock

log = logging.getLogger(__name__)

EXPERIMENT_DEFAULT = "pipeline"
GROUP_TAG = "pipeline.group"
_FLUSH_TIMEOUT_S = 60.0  # default end-of-stage wait for the sender (PIPELINE_TRACKING_FLUSH_S)
_KILLED_FLUSH_TIMEOUT_S = 10.0  # after SIGTERM/Ctrl-C: schedulers send SIGKILL ~30 s later
_SEND_RETRY_DELAYS_S = (1.0, 3.0)  # an event is tried 1 + len(...) times before the sender gives up
_LIVE_LOCK = "live.lock"
# MLflow 3 opens an experiment in its GenAI view unless the experiment says what it is for.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# What a parent run (one per `dvc repro` / `dvc exp run`) carries, so that the experiment's table
# and chart views compare pipelines at a glance: the evaluate stage's headline metrics (with
# their intervals) and the params that define a run.
PARENT_METRICS = ("fid", "fid_ci_low", "fid_ci_high", "kid", "kid_ci_low", "kid_ci_high", "IS", "IS_ci_low",
                  "IS_ci_high", "precision", "precision_ci_low", "precision_ci_high", "recall", "recall_ci_low",
                  "recall_ci_high", "inception.fid", "inception.kid", "inception.IS")
PARENT_PARAMS = ("base.seed", "data.source", "data.path", "data.limit", "data.channels", "preprocess.size",
                 "augment.copies", "train.model", "train.conditional", "train.steps", "train.batch_size", "train.nz",
                 "train.ngf", "train.ndf", "train.loss", "train.lr_g", "train.lr_d", "train.lr_decay_start",
                 "train.lr_decay_to", "train.n_critic", "train.r1_gamma",
                 "train.diffaug", "train.ada", "train.ema_decay", "train.precision", "train.devices")
# Loggers of "model" events by flavor, registered by the module that knows the model
# (pipeline.mlflow_models): a stage that logs no model does not import the model code.
MODEL_LOGGERS: dict[str, Callable[[Any, Mapping[str, Any], Path], None]] = {}


# ---------------------------------------------------------------------------------------------
# Where things live
# ---------------------------------------------------------------------------------------------


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(root or project_root()) / 'mlruns.db'}"


def journal_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / ".pipeline" / "tracking"


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) from /proc, or None off Linux."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), fields[19]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def group_key() -> str | None:
    """A key shared by all stages of one dvc invocation (None when run by hand)."""
    env = os.environ.get("PIPELINE_RUN_GROUP")
    if env:
        return env
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            break
        stat = _proc_stat(pid)
        if stat is None:
            break
        args = _cmdline(pid)
        if any(Path(a).name == "dvc" or a.endswith("/dvc") for a in args[:3]) or (
            len(args) > 2 and args[1:3] == ["-m", "dvc"]
        ):
            return f"dvc-{pid}-{stat[1]}"
        pid = stat[0]
    return None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_tags(root: Path) -> dict[str, str]:
    """MLflow's system tags for who ran what from where: user, source, git commit, branch and remote."""
    import getpass  # noqa: PLC0415

    tags = {"mlflow.source.type": "PROJECT", "mlflow.source.name": str(root)}
    with contextlib.suppress(Exception):  # no user name in some containers
        tags["mlflow.user"] = getpass.getuser()
    for tag, args in (("mlflow.source.git.commit", ("rev-parse", "HEAD")),
                      ("mlflow.source.git.branch", ("rev-parse", "--abbrev-ref", "HEAD")),
                      ("mlflow.source.git.repoURL", ("config", "--get", "remote.origin.url"))):
        value = _git(root, *args)
        if value and value != "HEAD":
            tags[tag] = value
    return tags


def _bounded_http_env() -> None:
    """Keep MLflow's client from retrying for minutes when the server is down (user values win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def flush_timeout(status: str | None = None) -> float:
    """Seconds a finishing stage waits for unsent events (PIPELINE_TRACKING_FLUSH_S, default 60)."""
    raw = os.environ.get("PIPELINE_TRACKING_FLUSH_S")
    try:
        timeout = float(raw) if raw else _FLUSH_TIMEOUT_S
    except ValueError:
        log.warning("PIPELINE_TRACKING_FLUSH_S=%r is not a number; using %.0f s", raw, _FLUSH_TIMEOUT_S)
        timeout = _FLUSH_TIMEOUT_S
    return min(timeout, _KILLED_FLUSH_TIMEOUT_S) if status == "KILLED" else timeout


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first touch of a SQLite store across processes.

    MLflow creates the tables and runs its migrations on first use without a lock, so two stages
    (parallel ``dvc exp`` jobs) opening a fresh ``mlruns.db`` at once make one of them fail with
    "duplicate column". The lock lives in the temp dir, keyed by the URI, as MLflow's own job
    store does; a read-only descriptor suffices for flock, so any user can take it.
    """
    if not uri.startswith("sqlite:"):
        yield
        return
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    fd = os.open(Path(tempfile.gettempdir()) / f"pipeline-mlflow-{key}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """state.json is read by mlflow-sync in another process: never let it see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _import_mlflow() -> Any:
    try:
        import mlflow  # noqa: PLC0415 - optional, heavy, and absent on GPU machines
    except ImportError:
        return None
    return mlflow


# ---------------------------------------------------------------------------------------------
# The MLflow side: applies journal events to a run (used live and by mlflow-sync)
# ---------------------------------------------------------------------------------------------


def _kept_copy(event: Mapping[str, Any], artifacts_dir: Path | None) -> Path:
    """Where an artifact event's bytes are: the journal's preserved copy if there is one, else the original.

    A preserved file sits in a folder of its own under its original name, because MLflow names a
    logged file after its basename (see StageRun._preserve_artifact).
    """
    original = Path(event["path"])
    if artifacts_dir is not None:
        kept_file = artifacts_dir / f"{event['copy']}.file" / original.name
        if kept_file.is_file():
            return kept_file
        kept_dir = artifacts_dir / event["copy"]
        if kept_dir.is_dir():
            return kept_dir
    return original


class _MlflowWriter:
    """Applies journal events to one MLflow run through the low-level client."""

    def __init__(self, mlflow: Any, uri: str, root: Path) -> None:
        self.mlflow = mlflow
        self.uri = uri
        self.root = root
        with _sqlite_init_lock(uri):
            # Creating the client opens the store, which creates and migrates a fresh SQLite file.
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            self.client.search_experiments(max_results=1)
        self.run_id: str | None = None
        self.parent_id: str | None = None

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older version, or by hand
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:") or "://" not in self.uri:
            location = (self.root / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except self.mlflow.exceptions.MlflowException:
            exp = self.client.get_experiment_by_name(name)  # created by a parallel stage
            if exp is None:
                raise
            return exp.experiment_id

    def _parent(self, experiment_id: str, group: str, title: str, start_ms: int,
                tags: Mapping[str, str] | None = None) -> str:
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`pipeline.kind` = 'pipeline'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        # The parent shares its children's user, source, git and DVC experiment tags.
        shared = {k: v for k, v in (tags or {}).items() if k.startswith(("mlflow.source.", "mlflow.user", "dvc."))}
        run = self.client.create_run(experiment_id, start_time=start_ms, run_name=title,
                                     tags={**shared, GROUP_TAG: group, "pipeline.kind": "pipeline"})
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], time_ms: int, step: int | None) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        items = [Metric(k, float(v), time_ms, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def apply(self, event: Mapping[str, Any], artifacts_dir: Path | None) -> None:
        kind = event["type"]
        c = self.client
        if kind == "start":
            exp_id = self._experiment_id(event["experiment"])
            tags = dict(event["tags"])
            if event.get("group"):
                tags["mlflow.parentRunId"] = self._parent(exp_id, event["group"], event["group_title"], event["time_ms"],
                                                          tags)
                self.parent_id = tags["mlflow.parentRunId"]
            if event.get("run_id"):
                self.run_id = event["run_id"]
            else:
                run = c.create_run(exp_id, start_time=event["time_ms"], run_name=event["run_name"], tags=tags)
                self.run_id = run.info.run_id
        elif kind == "params":
            self._log_params(self.run_id, event["params"])
        elif kind == "metrics":
            self._log_metrics(self.run_id, event["metrics"], event["time_ms"], event.get("step"))
        elif kind == "tags":
            for k, v in event["tags"].items():
                c.set_tag(self.run_id, k, str(v))
        elif kind == "parent":
            # Stage runs of one pipeline run share its parent; without one (a stage run by hand)
            # the values stay on the stage's own run only.
            if self.parent_id:
                self._log_params(self.parent_id, event.get("params") or {})
                self._log_metrics(self.parent_id, event.get("metrics") or {}, event["time_ms"], event.get("step"))
        elif kind == "image":
            from PIL import Image  # noqa: PLC0415

            with Image.open(_kept_copy(event, artifacts_dir)) as im:
                im.load()
                c.log_image(self.run_id, im, key=event["key"], step=int(event["step"]), timestamp=event["time_ms"],
                            synchronous=True)
        elif kind == "dataset":
            from mlflow.entities import Dataset, DatasetInput, InputTag  # noqa: PLC0415

            d = event["dataset"]
            dataset = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"],
                              source=json.dumps(d["source"]), schema=json.dumps(d.get("schema") or {}),
                              profile=json.dumps(d.get("profile") or {}))
            inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", event.get("context") or "training")])]
            c.log_inputs(self.run_id, datasets=inputs)
            if self.parent_id:
                c.log_inputs(self.parent_id, datasets=inputs)
        elif kind == "artifact":
            src = _kept_copy(event, artifacts_dir)
            if src.is_dir():
                c.log_artifacts(self.run_id, str(src), event.get("artifact_path"))
            else:
                c.log_artifact(self.run_id, str(src), event.get("artifact_path"))
        elif kind == "model":
            logger = MODEL_LOGGERS.get(event.get("flavor", "generator"))
            if logger is None:
                raise RuntimeError(f"no MLflow model logger for {event.get('flavor', 'generator')!r} is registered "
                                   "in this process (import pipeline.mlflow_models)")
            logger(self, event, _kept_copy(event, artifacts_dir))
        elif kind == "end":
            c.set_terminated(self.run_id, status=event["status"], end_time=event["time_ms"])
            if self.parent_id:
                # The parent takes the status of its latest stage after each stage (FINISHED,
                # FAILED or KILLED), so a pipeline is never left RUNNING; the next stage does not
                # reopen it.
                c.set_terminated(self.parent_id, status=event["status"], end_time=event["time_ms"])
        else:  # pragma: no cover - journal written by this module
            raise ValueError(f"unknown journal event {kind!r}")

# ---------------------------------------------------------------------------------------------
# The stage side
# ---------------------------------------------------------------------------------------------


class StageRun:
    """One tracked stage execution. Use as a context manager::

        with StageRun("train", params=to_dict(p.train)) as run:
            run.log_metrics({"loss": 0.3}, step=10)
            run.log_artifact("reports/grid.png", "grids")

    On leaving the block the run ends FINISHED, FAILED (an exception) or KILLED (KeyboardInterrupt
    or SIGTERM, which ``python -m pipeline`` turns into KeyboardInterrupt).
    """

    def __init__(self, stage: str, *, params: Mapping[str, Any] | None = None, root: Path | None = None,
                 experiment: str | None = None, enabled: bool | None = None) -> None:
        self.stage = stage
        self.root = root or project_root()
        self.local_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{stage}-{uuid.uuid4().hex[:8]}"
        self.dir = journal_dir(self.root) / self.local_id
        self.dir.mkdir(parents=True, exist_ok=True)
        # Held while this process lives: mlflow-sync leaves a journal alone while its lock is taken,
        # and the kernel drops it when the process dies, however it dies.
        self._live_fd = try_flock(self.dir / _LIVE_LOCK)
        self._journal = open(self.dir / "journal.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._n_events = 0
        self._ended = False
        self._files: list[tuple[int, dict[str, Any]]] = []  # artifact/model events, for preservation
        self._queue: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue()
        self._sender: threading.Thread | None = None
        self._state: dict[str, Any] = {"uri": None, "sent": 0, "run_id": None, "error": None}
        if enabled is None:
            enabled = os.environ.get("PIPELINE_TRACKING", "1") != "0"
        self._enabled = enabled
        self._experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT_DEFAULT
        self._params = dict(params or {})

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> StageRun:
        mlflow = _import_mlflow() if self._enabled else None
        if mlflow is not None:
            _bounded_http_env()
            self._state["uri"] = tracking_uri(self.root)
            self._sender = threading.Thread(target=self._send_loop, args=(mlflow,), name="mlflow-sender", daemon=True)
            self._sender.start()
        elif self._enabled:
            self._state["error"] = "mlflow is not installed; journaled locally (replay: python -m pipeline mlflow-sync)"
        group = group_key()
        tags = {**source_tags(self.root), "pipeline.stage": self.stage, "pipeline.kind": "stage",
                "pipeline.local_id": self.local_id}
        commit = tags.get("mlflow.source.git.commit")
        for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
            if os.environ.get(env):
                tags[tag] = os.environ[env]
        title = f"dvc repro {commit[:7] if commit else ''} {time.strftime('%Y-%m-%d %H:%M:%S')}".replace("  ", " ")
        if os.environ.get("DVC_EXP_NAME"):
            title = f"dvc exp {os.environ['DVC_EXP_NAME']}"
        self._emit({"type": "start", "experiment": self._experiment, "run_name": self.stage, "tags": tags,
                    "group": group, "group_title": title})
        if self._params:
            self.log_params(self._params)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
            self.set_tags({"pipeline.error": f"{exc_type.__name__}: {exc}"[:5000]})
        self._emit({"type": "end", "status": status})
        self.close(status)

    def close(self, status: str | None = None) -> None:
        """Wait (bounded) for the sender; whatever it did not send stays in the journal for mlflow-sync."""
        timeout = flush_timeout(status)
        sender_done = True
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join(timeout=timeout)
            if self._sender.is_alive():
                sender_done = False
                self._state["error"] = f"MLflow did not take the run's last events within {timeout:.0f} s"
                self._preserve_unsent()
        with self._lock:
            self._journal.close()
        self._write_state()
        if sender_done:
            _unlock(self._live_fd)  # else the kernel drops it at exit, when the sender cannot send any more
            self._live_fd = None
        if self._state["error"]:
            log.warning("MLflow tracking incomplete for %s (%s); the local journal %s has everything; "
                        "replay it with `python -m pipeline mlflow-sync`", self.stage, self._state["error"], self.dir)

    # -- public logging API (cheap: a journal line and a queue put) ------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        from .params import flatten  # noqa: PLC0415

        self._emit({"type": "params", "params": flatten(dict(params))})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self._emit({"type": "metrics", "metrics": clean, "step": step})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._emit({"type": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        if not path.exists():
            log.warning("not logging missing artifact %s", path)
            return
        self._emit({"type": "artifact", "path": str(path), "artifact_path": artifact_path,
                    "copy": f"{self._n_events:05d}-{path.name}"})

    def log_parent(self, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None) -> None:
        """Also put these params and metrics on the pipeline's parent run (when there is one)."""
        from .params import flatten  # noqa: PLC0415

        clean = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
        flat = flatten(dict(params or {}))
        if clean or flat:
            self._emit({"type": "parent", "params": flat, "metrics": clean})

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None:
        """An image in MLflow's image history under ``key`` at ``step`` (the run page's step slider)."""
        path = Path(path).resolve()
        if not path.is_file():
            log.warning("not logging missing image %s", path)
            return
        self._emit({"type": "image", "path": str(path), "key": key, "step": int(step),
                    "copy": f"{self._n_events:05d}-{path.name}"})

    def log_dataset(self, *, name: str, digest: str, source: Mapping[str, Any], profile: Mapping[str, Any],
                    schema: Mapping[str, Any] | None = None, context: str = "training") -> None:
        """The data a run used, as an MLflow dataset input (also on the parent run)."""
        self._emit({"type": "dataset", "context": context, "dataset": {
            "name": name, "digest": digest, "source_type": "local", "source": dict(source),
            "profile": dict(profile), "schema": dict(schema or {})}})

    def log_generator(self, path: str | os.PathLike, artifact_path: str = "generator") -> None:
        """Log a generator file (see :func:`pipeline.models.save_generator`) as an MLflow model."""
        path = Path(path).resolve()
        self._emit({"type": "model", "path": str(path), "artifact_path": artifact_path,
                    "copy": f"{self._n_events:05d}-{path.name}"})

    # -- internals --------------------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        event.setdefault("time_ms", int(time.time() * 1000))
        with self._lock:
            index = self._n_events
            self._n_events += 1
            self._journal.write(json.dumps(event, default=str) + "\n")
            self._journal.flush()
            if event["type"] in ("artifact", "model", "image"):
                self._files.append((index, event))
            elif event["type"] == "end":
                self._ended = True
        if self._sender is not None and self._sender.is_alive():
            self._queue.put((index, event))

    def _write_state(self) -> None:
        # Complete means ended *and* all sent: a journal whose process died after sending its last
        # event but before ending (kill -9) must still be picked up by mlflow-sync and closed.
        with self._state_lock:
            complete = self._ended and self._state["sent"] >= self._n_events
            state = dict(self._state, events=self._n_events, complete=complete)
            _write_json_atomic(self.dir / "state.json", state)

    def _send_loop(self, mlflow: Any) -> None:
        writer: _MlflowWriter | None = None
        failed = False
        while True:
            item = self._queue.get()
            if item is None:
                return
            index, event = item
            if failed:
                self._preserve_artifact(event)
                continue
            error = None
            # A few tries per event ride out a SQLite "database is locked" under parallel
            # experiments. Over HTTP, MLflow's client already retries (capped by
            # _bounded_http_env), so an outage is declared after one bounded call.
            delays = () if str(self._state["uri"]).startswith(("http:", "https:")) else _SEND_RETRY_DELAYS_S
            for delay in (*delays, None):
                try:
                    if writer is None:
                        writer = _MlflowWriter(mlflow, self._state["uri"], self.root)
                    writer.apply(event, None)
                    error = None
                    break
                except Exception as exc:  # noqa: BLE001 - any tracking failure must not fail the stage
                    error = f"{type(exc).__name__}: {str(exc)[:500]}"
                    if delay is None:
                        break
                    log.info("MLflow call failed (%s); retrying in %.0f s", error, delay)
                    time.sleep(delay)
            if error is None:
                with self._state_lock:
                    self._state["sent"] = index + 1
                    self._state["run_id"] = writer.run_id
            else:
                # Stop trying for the rest of this stage: the journal has everything and the
                # training loop must not pay for a dead server; mlflow-sync replays it later.
                failed = True
                self._state["error"] = error
                log.warning("MLflow unavailable (%s); continuing with the local journal only", error)
                self._preserve_artifact(event)
            self._write_state()

    def _preserve_unsent(self) -> None:
        """Copy the files of events the sender has not sent yet into the journal (end-of-stage timeout)."""
        sent = int(self._state["sent"])
        for index, event in list(self._files):
            if index >= sent:
                self._preserve_artifact(event)

    def _preserve_artifact(self, event: Mapping[str, Any]) -> None:
        """Copy an unsent artifact into the journal so a later replay logs what this run made.

        The original may be gone by then: a queued ``dvc exp`` runs in a temporary workspace that
        is deleted afterwards, and the next ``dvc repro`` overwrites models/ and reports/.
        """
        if event["type"] not in ("artifact", "model", "image"):
            return
        src = Path(event["path"])
        if src.is_dir():
            shutil.copytree(src, self.dir / "artifacts" / event["copy"], dirs_exist_ok=True)
        elif src.exists():
            dst = self.dir / "artifacts" / f"{event['copy']}.file" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        else:
            log.warning("artifact %s is gone; the replay of %s will lack it", src, self.dir.name)


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------


def pending_journals(root: Path | None = None) -> list[Path]:
    """Journal directories whose events were not all sent to MLflow."""
    base = journal_dir(root)
    out = []
    for d in sorted(base.glob("*/")) if base.exists() else []:
        state_file = d / "state.json"
        if not (d / "journal.jsonl").exists():
            continue
        state = json.loads(state_file.read_text()) if state_file.exists() else {"complete": False}
        if not state.get("complete"):
            out.append(d)
    return out


def _replay(mlflow: Any, d: Path, uri: str, root: Path) -> str:
    """Send what one journal's live sender did not; return the run id."""
    state_file = d / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    events = [json.loads(line) for line in (d / "journal.jsonl").read_text().splitlines() if line.strip()]
    if not events:
        raise ValueError("empty journal (the stage died before its first event)")
    sent = int(state.get("sent", 0)) if state.get("uri") == uri and state.get("run_id") else 0
    writer = _MlflowWriter(mlflow, uri, root)
    if sent:
        # Continue the run that the outage interrupted instead of making a second one.
        writer.apply(dict(events[0], run_id=state["run_id"]), d / "artifacts")
    for i, event in enumerate(events):
        if i < sent:
            continue
        writer.apply(event, d / "artifacts")
        state.update(uri=uri, sent=i + 1, run_id=writer.run_id)
        _write_json_atomic(state_file, state)  # a sync interrupted midway resumes here
    if events[-1]["type"] != "end":
        # The stage process died without ending its run (kill -9, OOM, a lost machine): the run
        # may sit RUNNING on the server; record honestly that it was killed.
        writer.apply({"type": "end", "status": "KILLED", "time_ms": int(time.time() * 1000)}, None)
    state.update(uri=uri, sent=len(events), run_id=writer.run_id, error=None, complete=True, events=len(events))
    _write_json_atomic(state_file, state)
    return writer.run_id or "?"


def server_down(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server cannot be reached (connection refused, no route, timeout), or None.

    One TCP connect, no retries: a server known to be down is reported at once instead of after
    the client's retries per request (seconds per journal, minutes for a backlog).
    """
    import socket  # noqa: PLC0415
    import urllib.parse  # noqa: PLC0415

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"{uri}: not a valid port"
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{parts.hostname}:{port}: {exc.strerror or type(exc).__name__}"


def sync(root: Path | None = None, *, uri: str | None = None) -> list[tuple[str, str, str]]:
    """Replay every incomplete journal into MLflow; return (journal, outcome, detail) triples.

    outcome is "synced" (detail: the run id), "running" (its stage still holds the journal's lock;
    left alone) or "failed" (detail: the error; the journal is kept for the next try).
    """
    root = root or project_root()
    mlflow = _import_mlflow()
    if mlflow is None:
        raise RuntimeError("mlflow is not installed here; run mlflow-sync where it is")
    _bounded_http_env()
    uri = uri or tracking_uri(root)
    down = server_down(uri)
    if down:
        raise ConnectionError(f"cannot connect to the tracking server {uri} ({down})")
    results: list[tuple[str, str, str]] = []
    pending = pending_journals(root)
    for i, d in enumerate(pending):
        fd = try_flock(d / _LIVE_LOCK)  # also keeps two syncs from replaying one journal twice
        if fd is None:
            results.append((d.name, "running", "its stage is still running; it sends its own events"))
            continue
        try:
            results.append((d.name, "synced", _replay(mlflow, d, uri, root)))
        except Exception as exc:  # noqa: BLE001 - report per journal and go on with the others
            results.append((d.name, "failed", f"{type(exc).__name__}: {str(exc)[:300]}"))
            down = server_down(uri)
            if down:  # the server went away: the other journals would each wait out the retries
                results += [(rest.name, "failed", f"not tried: the tracking server went down ({down})")
                            for rest in pending[i + 1 :]]
                break
        finally:
            _unlock(fd)
    return results

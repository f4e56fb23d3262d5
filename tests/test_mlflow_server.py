"""Tracking against a real ``mlflow server`` on 127.0.0.1: live logging, an outage, run statuses, replay.

The server is the team setup of the README ("Team setup"): a SQL backend and an artifact root,
bound to 127.0.0.1. Every test uses its own MLflow experiment on the module's server, and the
stages run as subprocesses exactly as ``dvc repro`` runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers_team import (VENV_BIN, MlflowServer, dvc, kill_group, pipeline, set_params, tool_env, wait_for)

pytestmark = pytest.mark.slow


def tracked_env(server: MlflowServer, experiment: str) -> dict[str, str]:
    return tool_env(PIPELINE_TRACKING="1", MLFLOW_TRACKING_URI=server.uri, MLFLOW_EXPERIMENT_NAME=experiment)


def runs(client: Any, experiment: str, **tags: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()) or None
    return client.search_runs([exp.experiment_id], filter_string=where or "", max_results=200)


def journals(project: Path, stage: str) -> list[Path]:
    return sorted((project / ".pipeline" / "tracking").glob(f"*-{stage}-*"))


def journal_events(d: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d / "journal.jsonl").read_text().splitlines() if line.strip()]


def journal_state(d: Path) -> dict[str, Any]:
    return json.loads((d / "state.json").read_text())


def artifact_files(client: Any, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def metric_steps(client: Any, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def image_steps(client: Any, run_id: str, key: str) -> list[int]:
    """Steps of ``key``'s image history (MLflow names each image images/<key>+step+<step>+...)."""
    names = [f.path for f in client.list_artifacts(run_id, "images")]
    return sorted(int(n.split("+step+")[1].split("+")[0]) for n in names
                  if n.startswith(f"images/{key}+step+") and n.endswith(".png"))


def journal_metric_steps(events: list[dict[str, Any]], key: str) -> list[int]:
    return sorted(e["step"] for e in events if e["type"] == "metrics" and key in e["metrics"])


def _as_if_from_a_terminal() -> None:
    # A job started in the background by a non-interactive shell (CI runners, `nohup … &`)
    # inherits SIGINT ignored, and Python then keeps it ignored; Ctrl-C means a foreground job.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_train(project: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_as_if_from_a_terminal)


def wait_for_server_metrics(server: MlflowServer, experiment: str, key: str = "loss_d", points: int = 1) -> Any:
    """The train run once ``points`` values of ``key`` have reached the server."""
    client = server.client()

    def arrived() -> Any:
        found = runs(client, experiment, **{"pipeline.stage": "train"})
        return found[0] if found and len(client.get_metric_history(found[0].info.run_id, key)) >= points else None

    return wait_for(arrived, 240, f"{points} x {key} of the train run on the server", interval=0.25)


def assert_generator_model_loads(client: Any, experiment: str, run_id: str) -> None:
    """The logged generator is an MLflow pytorch model that makes images of the data's shape."""
    import mlflow  # noqa: PLC0415
    import torch  # noqa: PLC0415

    exp = client.get_experiment_by_name(experiment)
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.name for m in models] == ["generator"]
    mlflow.set_tracking_uri(client.tracking_uri)
    generator = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    with torch.no_grad():
        images = generator(torch.randn(3, 64))
    assert tuple(images.shape) == (3, 1, 28, 28)


# ---------------------------------------------------------------------------------------------


def test_dvc_repro_logs_params_metrics_grids_and_model_to_the_server(project: Path, mlflow_server: MlflowServer) -> None:
    env = tracked_env(mlflow_server, "live")
    dvc("repro", "--force", "--single-item", "train", cwd=project, env=env)
    client = mlflow_server.client()
    (run,) = runs(client, "live", **{"pipeline.stage": "train"})
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "20" and run.data.params["base.seed"] == "0"
    assert metric_steps(client, run.info.run_id, "loss_d") == [5, 10, 15, 20]
    assert metric_steps(client, run.info.run_id, "score") == [10, 20]
    assert "final_step" in run.data.metrics and "stage_seconds" in run.data.metrics
    files = artifact_files(client, run.info.run_id)
    assert "train/summary.json" in files
    assert image_steps(client, run.info.run_id, "samples") == [0, 10, 20]  # the step slider's grids
    assert_generator_model_loads(client, "live", run.info.run_id)
    # One `dvc repro` reads as one tree: the stage hangs under a pipeline parent run, not RUNNING.
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["pipeline.kind"] == "pipeline" and parent.info.status == "FINISHED"
    (journal,) = journals(project, "train")
    state = journal_state(journal)
    assert state["complete"] and state["run_id"] == run.info.run_id and state["error"] is None


def test_server_outage_during_training_costs_nothing_and_mlflow_sync_replays_it(
        project: Path, mlflow_server: MlflowServer) -> None:
    set_params(project, {"train": {"steps": 250, "log_every": 5, "checkpoint_every": 125, "grid_every": 125,
                                   "eval_every": 125}})
    env = tracked_env(mlflow_server, "outage")
    proc = start_train(project, env)
    try:
        wait_for_server_metrics(mlflow_server, "outage", points=5)
        outage_ms = time.time() * 1000
        mlflow_server.stop()  # SIGKILL: the server vanishes mid-run
        out, err = proc.communicate(timeout=400)
    finally:
        kill_group(proc)
    err_text = err.decode(errors="replace")
    assert proc.returncode == 0, err_text[-4000:]
    assert "MLflow unavailable" in err_text and "mlflow-sync" in err_text

    (journal,) = journals(project, "train")
    events = journal_events(journal)
    state = journal_state(journal)
    assert not state["complete"] and state["sent"] < state["events"] == len(events)
    # The local record is complete: every log line of the step log is in the journal, and it ends.
    step_log = [json.loads(x) for x in (project / "reports" / "train" / "log.jsonl").read_text().splitlines()]
    assert journal_metric_steps(events, "loss_d") == sorted(r["step"] for r in step_log if "loss_d" in r)
    assert journal_metric_steps(events, "loss_d")[-1] == 250
    assert events[-1]["type"] == "end" and events[-1]["status"] == "FINISHED"

    # Training did not slow down: throughput after the outage is in line with before it (a wide
    # margin: this is a check that the loop never waits on the network, not a benchmark).
    speed = [(e["time_ms"], e["metrics"]["images_per_s"]) for e in events
             if e["type"] == "metrics" and "images_per_s" in e["metrics"]]
    before = [v for t, v in speed if t < outage_ms][1:]  # the first interval includes warm-up
    after = [v for t, v in speed if t > outage_ms + 1000]
    assert len(before) >= 3 and len(after) >= 10, (len(before), len(after))
    assert statistics.median(after) > 0.5 * statistics.median(before), (before, after)
    # And the stage did not hang at the end: it exited soon after its last step.
    end_ms = events[-1]["time_ms"]
    last_step_ms = max(t for t, _ in speed)
    assert end_ms - last_step_ms < 60_000

    mlflow_server.start()  # back, on the same store
    synced = pipeline("mlflow-sync", cwd=project, env=env)
    assert f"{journal.name}: synced: {state['run_id']}" in synced.stdout, synced.stdout
    client = mlflow_server.client()
    (run,) = runs(client, "outage", **{"pipeline.stage": "train"})  # continued, not a second run
    assert run.info.run_id == state["run_id"] and run.info.status == "FINISHED"
    for key in ("loss_d", "loss_g", "images_per_s"):
        assert metric_steps(client, run.info.run_id, key) == journal_metric_steps(events, key), key
    assert metric_steps(client, run.info.run_id, "score") == [125, 250]
    assert run.data.params["train.steps"] == "250"
    files = artifact_files(client, run.info.run_id)
    assert "train/summary.json" in files
    assert image_steps(client, run.info.run_id, "samples") == [0, 125, 250]  # replayed from the journal's copies
    assert_generator_model_loads(client, "outage", run.info.run_id)
    assert journal_state(journal)["complete"]
    again = pipeline("mlflow-sync", cwd=project, env=env)
    assert "nothing to sync" in again.stdout


def test_a_hung_server_delays_the_end_of_a_stage_by_the_flush_bound_only(
        project: Path, mlflow_server: MlflowServer) -> None:
    """A server that accepts connections and never answers (hung, not down): the stage still ends.

    The stage waits PIPELINE_TRACKING_FLUSH_S for its sender (60 s by default, 5 s here), keeps a
    copy of every artifact the sender could not send, and mlflow-sync delivers the run later to
    whichever server it is pointed at.
    """
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
        env = tool_env(PIPELINE_TRACKING="1", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{blackhole.getsockname()[1]}",
                       MLFLOW_EXPERIMENT_NAME="hung", PIPELINE_TRACKING_FLUSH_S="5")
        proc = pipeline("clean", cwd=project, env=env)
        exited = time.time()
    (journal,) = journals(project, "clean")
    events = journal_events(journal)
    # From the run's end to the process's exit: the 5 s bound plus interpreter shutdown. Unbounded,
    # it would be the hung call's 10 s timeout times MLflow's 3 tries.
    waited = exited - events[-1]["time_ms"] / 1000
    assert 5 <= waited < 15, waited
    assert "did not take the run's last events within 5 s" in proc.stderr
    state = journal_state(journal)
    assert not state["complete"] and state["sent"] == 0 and events[-1]["status"] == "FINISHED"
    (artifact,) = [e for e in events if e["type"] == "artifact"]
    assert (journal / "artifacts" / f"{artifact['copy']}.file" / "clean_report.json").is_file()

    (project / "reports" / "clean_report.json").unlink()  # the original is gone by the time of the sync
    synced = pipeline("mlflow-sync", "--tracking-uri", mlflow_server.uri, cwd=project, env=env)
    assert f"{journal.name}: synced:" in synced.stdout, synced.stdout
    client = mlflow_server.client()
    (run,) = runs(client, "hung", **{"pipeline.stage": "clean"})
    assert run.info.status == "FINISHED" and "accepted" in run.data.metrics
    assert artifact_files(client, run.info.run_id) == {"clean/clean_report.json"}


def test_a_failing_stage_ends_its_run_failed(project: Path, mlflow_server: MlflowServer) -> None:
    proc = pipeline("preprocess", "--clean", "data/no-such-dir", cwd=project,
                    env=tracked_env(mlflow_server, "failed"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (run,) = runs(mlflow_server.client(), "failed", **{"pipeline.stage": "preprocess"})
    assert run.info.status == "FAILED"
    assert "DataError" in run.data.tags["pipeline.error"] and "no-such-dir" in run.data.tags["pipeline.error"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_end_the_run_killed(project: Path, mlflow_server: MlflowServer, sig: int) -> None:
    experiment = f"killed-{sig}"
    set_params(project, {"train": {"steps": 100_000, "log_every": 5}})
    proc = start_train(project, tracked_env(mlflow_server, experiment))
    try:
        wait_for_server_metrics(mlflow_server, experiment)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    err_text = err.decode(errors="replace")
    assert proc.returncode == 130, err_text[-3000:]
    assert "checkpoint saved" in err_text
    (run,) = runs(mlflow_server.client(), experiment, **{"pipeline.stage": "train"})
    assert run.info.status == "KILLED"
    (journal,) = journals(project, "train")
    assert journal_state(journal)["complete"] and journal_events(journal)[-1]["status"] == "KILLED"


def test_kill_9_leaves_the_run_running_until_mlflow_sync_ends_it_killed(
        project: Path, mlflow_server: MlflowServer) -> None:
    set_params(project, {"train": {"steps": 100_000, "log_every": 5}})
    env = tracked_env(mlflow_server, "kill9")
    proc = start_train(project, env)
    try:
        live = wait_for_server_metrics(mlflow_server, "kill9")
        # A sync while the stage runs leaves its run alone (the stage holds its journal's lock).
        during = pipeline("mlflow-sync", cwd=project, env=env)
        assert ": running: its stage is still running" in during.stdout, during.stdout
        assert mlflow_server.client().get_run(live.info.run_id).info.status == "RUNNING"
        kill_group(proc, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    client = mlflow_server.client()
    assert client.get_run(live.info.run_id).info.status == "RUNNING"  # nothing can end it from inside

    synced = pipeline("mlflow-sync", cwd=project, env=env)
    (journal,) = journals(project, "train")
    assert f"{journal.name}: synced: {live.info.run_id}" in synced.stdout, synced.stdout
    run = client.get_run(live.info.run_id)
    assert run.info.status == "KILLED"
    events = journal_events(journal)
    assert metric_steps(client, run.info.run_id, "loss_d") == journal_metric_steps(events, "loss_d")


def test_parallel_queued_experiments_both_log_to_one_store(project: Path) -> None:
    # The default store: SQLite at the project root, which two writers at once can trip over.
    env = tool_env(PIPELINE_TRACKING="1")
    assert not (project / "mlruns.db").exists()
    dvc("exp", "run", "--queue", "-S", "report.grid_nrow=4", "-n", "exp-a", cwd=project, env=env)
    dvc("exp", "run", "--queue", "-S", "report.grid_nrow=2", "-n", "exp-b", cwd=project, env=env)
    try:
        # Output to a file, not a pipe: the workers run on in the background holding what `queue start`
        # was given as stdout, and a pipe would keep this call waiting for them (a worker whose
        # shutdown stalls held it past any timeout); a user's terminal does not wait for them either.
        log = project.parent / "queue-start.log"
        with log.open("w") as out:
            started = subprocess.run([str(VENV_BIN / "dvc"), "queue", "start", "-j", "2"], cwd=project, env=dict(env),
                                     stdout=out, stderr=subprocess.STDOUT, timeout=120)
        assert started.returncode == 0, log.read_text()

        def both_ended() -> bool:  # cheap file checks first: each `dvc queue status` costs a CPU second
            return sum(bool(journal_events(d)) and journal_events(d)[-1]["type"] == "end"
                       for d in journals(project, "report")) == 2

        wait_for(both_ended, 400, "both experiments' report stages", interval=1)

        def finished() -> str | None:
            status = dvc("queue", "status", cwd=project, env=env).stdout
            return None if ("Queued" in status or "Running" in status) else status

        status = wait_for(finished, 200, "both queued experiments", interval=3)
    finally:
        dvc("queue", "stop", "--kill", cwd=project, env=env, check=False)
        for pid_file in (project / ".dvc" / "tmp" / "exps" / "celery").glob("*.pid"):  # a stalled worker too
            with contextlib.suppress(ValueError, OSError):
                group = os.getpgid(int(pid_file.read_text()))
                if group != os.getpgrp():  # each worker's own group (dvc-task starts one), never this test's
                    os.killpg(group, signal.SIGKILL)
    assert status.count("Success") == 2, status

    # Both experiments logged, from their temporary workspaces, into the project's one store.
    states = [journal_state(d) for d in journals(project, "report")]
    assert len(states) == 2 and all(s["complete"] and s["error"] is None for s in states), states
    import mlflow  # noqa: PLC0415

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")
    found = runs(client, "pipeline", **{"pipeline.stage": "report"})
    assert sorted(r.data.tags["dvc.exp_name"] for r in found) == ["exp-a", "exp-b"]
    # Each experiment's parent run carries its name and baseline commit too, as do its stage runs.
    parents = runs(client, "pipeline", **{"pipeline.kind": "pipeline"})
    assert sorted(p.data.tags["dvc.exp_name"] for p in parents) == ["exp-a", "exp-b"]
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert {r.data.tags["dvc.baseline_rev"] for r in [*found, *parents]} == {baseline}
    assert all(r.info.status == "FINISHED" for r in found)
    assert {r.info.run_id for r in found} == {s["run_id"] for s in states}
    # They really ran at the same time.
    (a, b) = sorted(found, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time, "the two experiments did not overlap"

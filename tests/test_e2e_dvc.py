"""End to end: the real `dvc repro` in a fresh git+DVC project on a tiny configuration."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers_project import make_project, run, tiny_params, venv_env, write_params

STAGES = ["inputs", "download", "clean", "preprocess", "augment", "evaluator", "train", "evaluate", "report"]
# Stages that open an MLflow run (inputs, which fingerprints data.path on every repro, does not).
TRACKED = STAGES[1:]


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = make_project(tmp_path_factory.mktemp("e2e") / "project", tiny_params())
    out = run(["dvc", "repro"], root, env=venv_env())
    return {"root": root, "output": out.stdout + out.stderr}


def _declared(root: Path) -> dict[str, dict[str, list[str]]]:
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in spec.items():
        def names(entries: list[Any]) -> list[str]:
            return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]
        out[name] = {"deps": names(st.get("deps")), "outs": names(st.get("outs")) + names(st.get("metrics"))
                     + names(st.get("plots"))}
    return out


def test_repro_runs_every_stage_and_leaves_every_declared_output(built: dict[str, Any]) -> None:
    root = built["root"]
    assert _ran(built["output"]) == STAGES
    for stage, d in _declared(root).items():
        for rel in d["outs"]:
            path = root / rel
            assert path.exists(), f"{stage}: declared output {rel} is missing"
            if path.is_dir():
                assert any(path.iterdir()), f"{stage}: output directory {rel} is empty"
            else:
                assert path.stat().st_size > 0, f"{stage}: output {rel} is empty"


def test_metrics_are_finite_and_carry_the_protocol(built: dict[str, Any]) -> None:
    metrics = json.loads((built["root"] / "reports/metrics.json").read_text())
    for key in ("fid", "fid_ci_low", "fid_ci_high", "kid", "IS", "precision", "recall", "density", "coverage"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["fid_ci_low"] <= metrics["fid"] <= metrics["fid_ci_high"]
    assert all(isinstance(v, (int, float)) for v in metrics.values()), "metrics.json holds numbers only"
    beside = json.loads((built["root"] / "reports/eval_protocol.json").read_text())
    prot = beside["protocol"]
    assert prot["generated_samples"] == 40 and prot["reference_split"] == "test"
    evaluator = json.loads((built["root"] / "reports/evaluator.json").read_text())
    assert prot["extractor_sha256"] == evaluator["sha256"]
    assert beside["inception"]["computed"] is False and "inception_weights" in beside["inception"]["reason"]


def test_sample_grid_is_a_real_image_of_the_right_layout(built: dict[str, Any]) -> None:
    img = np.asarray(Image.open(built["root"] / "reports/figures/samples.png").convert("L"))
    # 16 samples of 28x28, 8 per row, 2 px padding, enlarged 2x: (2 rows, 8 columns).
    assert img.shape == (2 * (2 * 30 + 2), 2 * (8 * 30 + 2))
    assert img.std() > 10, "the grid is (nearly) constant"


def test_second_repro_changes_nothing(built: dict[str, Any]) -> None:
    out = run(["dvc", "repro"], built["root"], env=venv_env(PIPELINE_TRACKING="0"))
    assert _ran(out.stdout) == ["inputs"]  # always run: it fingerprints data.path, and finds it unchanged
    for stage in TRACKED:
        assert f"Stage '{stage}' didn't change, skipping" in out.stdout, out.stdout


def test_mlflow_has_one_parent_run_with_a_finished_child_per_stage(built: dict[str, Any]) -> None:
    db = sqlite3.connect(built["root"] / "mlruns.db")
    runs = db.execute("select run_uuid, name, status from runs").fetchall()
    tags = {}
    for run_uuid, key, value in db.execute("select run_uuid, key, value from tags"):
        tags.setdefault(run_uuid, {})[key] = value
    parents = [r for r in runs if tags[r[0]].get("pipeline.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0][2] == "FINISHED"
    children = [r for r in runs if tags[r[0]].get("mlflow.parentRunId") == parents[0][0]]
    assert sorted(r[1] for r in children) == sorted(TRACKED)
    assert all(r[2] == "FINISHED" for r in children)
    train_id = next(r[0] for r in children if r[1] == "train")
    steps = db.execute("select distinct step from metrics where run_uuid=? and key='loss_d'", (train_id,)).fetchall()
    assert len(steps) == 3  # logged every 2 of 6 steps
    params = dict(db.execute("select key, value from params where run_uuid=?", (train_id,)).fetchall())
    assert params["train.steps"] == "6" and params["base.seed"] == "0"


def test_parent_run_is_comparable_and_children_carry_images_dataset_and_source(built: dict[str, Any]) -> None:
    """What MLflow's experiment page shows: parents with metrics and params, an image history, the dataset."""
    import mlflow

    root = built["root"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    exp = client.get_experiment_by_name("pipeline")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow 3's GenAI view
    (parent,) = client.search_runs([exp.experiment_id], "tags.`pipeline.kind` = 'pipeline'")
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for key in ("fid", "fid_ci_low", "fid_ci_high", "kid", "IS", "precision", "recall"):
        assert parent.data.metrics[key] == pytest.approx(metrics[key]), key
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert parent.data.params["train.model"] == "dcgan" and parent.data.params["train.steps"] == "6"
    assert parent.data.params["data.source"] == params["data"]["source"] and parent.data.params["data.limit"] == "80"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    train = next(r for r in children if r.info.run_name == "train")
    # The grids are an image history (the run page's step slider): key "samples", one per grid step.
    names = [f.path for f in client.list_artifacts(train.info.run_id, "images")]
    steps = sorted(int(n.split("+step+")[1].split("+")[0]) for n in names
                   if n.startswith("images/samples+step+") and n.endswith(".png"))
    assert steps == [0, 3, 6]
    assert train.data.tags["mlflow.loggedImages"] == "True"
    assert train.data.tags["train.resumed"] == "False"  # the published files do not say; the run's tags do
    # The training data is a dataset input with the tensors' content digest, size and resolution.
    meta = json.loads((root / "data/tensors/meta.json").read_text())
    for run_id in (train.info.run_id, parent.info.run_id):
        (ds,) = [d.dataset for d in client.get_run(run_id).inputs.dataset_inputs]
        assert ds.digest == meta["content_sha256"][:32] and ds.name == f"{params['data']['source']}-28x28"
        profile = json.loads(ds.profile)
        assert profile["resolution"] == "28x28" and profile["train_images"] == meta["splits"]["train"]["count"]
    # Who, what and from where, on children and parent alike.
    commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    for r in (parent, *children):
        assert r.data.tags["mlflow.source.git.commit"] == commit and r.data.tags["mlflow.user"]
        assert r.data.tags["mlflow.source.type"] == "PROJECT"


def test_sample_command_writes_npz_and_png(built: dict[str, Any]) -> None:
    root = built["root"]
    run([sys.executable, "-m", "pipeline", "sample", "--checkpoint", "models/best.pt", "--n", "10",
         "--out", "s.npz", "--device", "cpu"], root)
    with np.load(root / "s.npz", allow_pickle=False) as z:
        assert z["images"].shape == (10, 1, 28, 28) and z["images"].dtype == np.uint8
    run([sys.executable, "-m", "pipeline", "sample", "--n", "6", "--out", "g.png", "--nrow", "3", "--scale", "1"], root)
    assert Image.open(root / "g.png").size == (3 * 30 + 2, 2 * 30 + 2)
    bad = run([sys.executable, "-m", "pipeline", "sample", "--n", "3", "--out", "x.jpg"], root, check=False)
    assert bad.returncode == 2 and "use a .npz" in bad.stderr


def test_param_changes_rerun_only_what_depends_on_them_and_metrics_diff_shows_it(built: dict[str, Any]) -> None:
    root = built["root"]
    env = venv_env(PIPELINE_TRACKING="0")
    run(["git", "add", "-A"], root, env=env)
    run(["git", "commit", "-q", "-m", "first run"], root, env=env)
    params = yaml.safe_load((root / "params.yaml").read_text())

    # A train param: train, evaluate and report re-run; nothing upstream does.
    params["train"]["lr_g"] = 1e-3
    write_params(root / "params.yaml", params)
    out = run(["dvc", "repro"], root, env=env)
    assert _ran(out.stdout) == ["inputs", "train", "evaluate", "report"]
    run(["git", "add", "-A"], root, env=env)
    run(["git", "commit", "-q", "-m", "faster generator"], root, env=env)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "--json"], root, env=env).stdout)
    changed = diff["reports/metrics.json"]
    assert "fid" in changed and changed["fid"]["diff"] != 0

    # A clean-stage data param: download is skipped, clean re-runs.
    params["data"]["dedup"] = False
    write_params(root / "params.yaml", params)
    out = run(["dvc", "repro"], root, env=env)
    ran = _ran(out.stdout)
    assert ran[:2] == ["inputs", "clean"] and "download" not in ran

    # A download param: everything from download on (the data itself changes).
    params["data"]["limit"] = 70
    write_params(root / "params.yaml", params)
    out = run(["dvc", "repro"], root, env=env)
    assert _ran(out.stdout) == STAGES


def test_the_generator_is_a_registered_model_artifact(built: dict[str, Any], tmp_path: Path) -> None:
    """dvc.yaml's `artifacts:` makes the generator a model for DVC's registry commands."""
    root = built["root"]
    env = venv_env(PIPELINE_TRACKING="0")
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["artifacts"]["generator"]
    assert spec["type"] == "model" and spec["path"] == "models/best.pt" and spec["desc"] and spec["labels"]
    run(["git", "add", "-A"], root, env=env)
    run(["git", "commit", "-q", "--allow-empty", "-m", "register"], root, env=env)
    # GTO's convention, which `dvc artifacts get` reads: an annotated tag <name>@v<semver>.
    run(["git", "tag", "-a", "generator@v1.0.0", "-m", "Registering artifact generator version v1.0.0"], root, env=env)
    out = tmp_path / "generator.pt"
    run(["dvc", "artifacts", "get", ".", "generator", "-o", str(out)], root, env=env)
    assert out.read_bytes() == (root / "models/best.pt").read_bytes()
    got = run([sys.executable, "-m", "pipeline", "sample", "--checkpoint", str(out), "--n", "4", "--out",
               str(tmp_path / "s.npz"), "--device", "cpu"], root, env=env)
    assert "wrote 4 samples" in got.stdout

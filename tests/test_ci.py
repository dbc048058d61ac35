"""`tuneloop ci init`: the workflow it writes, run step by step as written, the way GitHub Actions runs `run:`
steps (`bash --noprofile --norc -eo pipefail`, $GITHUB_ENV and $GITHUB_PATH carried to the next steps),
against a tiny recipe in a temporary git repository: a first run on main promotes the first version, a second
passes the gate and is promoted, a pull request that breaks the learning rate fails on its gate and moves
nothing. Then what init refuses: an existing file without --force, an unknown provider, a recipe outside the
repository."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tuneloop
from tuneloop import registry
from tuneloop.ci import PROVIDERS, init_workflow
from tuneloop.errors import ConfigError, NotFoundError, TuneloopError

SRC = Path(tuneloop.__file__).resolve().parents[1]


def _soup(path: Path, n: int, start: int, rng: random.Random) -> None:
    rows = []
    for i in range(start, start + n):
        good = i % 2
        word = rng.choice(["great", "tasty", "lovely"] if good else ["awful", "stale", "bland"])
        # the word last: the tiny model classifies from the last token
        rows.append({"text": f"soup {i} was {word}", "label": "good" if good else "bad"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(model: Path, train: dict) -> str:
    return yaml.safe_dump({
        "name": "soup", "task": "classify", "model": str(model),
        "data": {"train": "../data/train.jsonl", "test": "../data/test.jsonl"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "eval": {"batch_size": 16, "systems": ["tuned"], "probe_sample": 0, "forgetting": False},
        "train": {"batch_size": 8, "precision": "fp32", "threads": 1, "max_length": 48, **train}})


GOOD = {"max_steps": 40, "lr": 3.0e-2}  # right on every test example
BROKEN = {"max_steps": 1, "lr": 1.0e-6}  # the untrained head: far below


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path, tiny_llama_dir) -> Path:
    r = tmp_path / "repo"
    (r / "data").mkdir(parents=True)
    (r / "recipes").mkdir()
    rng = random.Random(0)
    _soup(r / "data" / "train.jsonl", 64, 0, rng)
    _soup(r / "data" / "test.jsonl", 60, 1000, rng)
    (r / "recipes" / "soup.yaml").write_text(_recipe(tiny_llama_dir, GOOD))
    (r / ".gitignore").write_text("workspace/\n")
    _git(r, "init", "-q", "-b", "main")
    _git(r, "add", ".")
    _git(r, "commit", "-q", "-m", "soup")
    return r


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    """`tuneloop` on PATH: this venv's interpreter with this worktree's source (what `make setup` gives CI)."""
    d = tmp_path / "bin"
    d.mkdir()
    w = d / "tuneloop"
    w.write_text(f'#!/bin/sh\nPYTHONPATH="{SRC}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" '
                 f'-m tuneloop.cli "$@"\n')
    w.chmod(0o755)
    return d


def run_steps(workflow: Path, repo: Path, bin_dir: Path, ref: str, event: str) -> list[tuple[str, int, str]]:
    """Run the workflow's `run:` steps in order as GitHub Actions does: each a bash script under `-eo pipefail`,
    with the job's env, $GITHUB_ENV lines added to the env of the steps after it and $GITHUB_PATH lines put in
    front of PATH; the first failing step stops the job. Returns (name, exit code, output) per step run."""
    doc = yaml.safe_load(workflow.read_text())
    (job,) = doc["jobs"].values()
    assert job["defaults"]["run"]["shell"] == "bash"  # GitHub's `bash` is `bash --noprofile --norc -eo pipefail`
    env = {**os.environ, **{k: str(v) for k, v in job["env"].items()}, "CI": "true", "GITHUB_REF": ref,
           "GITHUB_EVENT_NAME": event, "GITHUB_WORKSPACE": str(repo)}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    tmp = repo.parent / f"runner-{event}-{len(list(repo.parent.glob('runner-*')))}"
    tmp.mkdir()
    env["RUNNER_TEMP"] = str(tmp)
    done = []
    for i, step in enumerate(s for s in job["steps"] if "run" in s):
        script = step["run"]
        if "make setup" in script:
            # The venv exists (this test runs in it): `make setup` would only rebuild it.
            assert script.splitlines()[0] == "make setup"
            script = script.replace("make setup\n", "", 1)
        env_file, path_file = tmp / f"env-{i}", tmp / f"path-{i}"
        env_file.touch()
        path_file.touch()
        (tmp / f"step-{i}.sh").write_text(script)
        p = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(tmp / f"step-{i}.sh")],
                           cwd=repo, env={**env, "GITHUB_ENV": str(env_file), "GITHUB_PATH": str(path_file)},
                           capture_output=True, text=True)
        done.append((step["name"], p.returncode, p.stdout + p.stderr))
        if p.returncode != 0:
            break
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
        for line in path_file.read_text().splitlines():
            env["PATH"] = f"{line}:{env['PATH']}"
    return done


@pytest.mark.slow
def test_the_workflow_runs_as_written_first_promotion_gate_and_a_failing_pull_request(repo, bin_dir, tiny_llama_dir):
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    p = subprocess.run(["tuneloop", "ci", "init", "--recipe", "recipes/soup.yaml"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    workflow = repo / PROVIDERS["github"].path
    doc = yaml.safe_load(workflow.read_text())
    (job,) = doc["jobs"].values()
    runs = [s["run"] for s in job["steps"] if "run" in s]
    # make setup and tuneloop commands only: no interpreter or installer of its own
    assert all("tuneloop " in r or r.startswith("make setup\n") for r in runs)
    assert not any(w in r for r in runs for w in ("python", "pip ", "curl"))
    assert job["env"]["TUNELOOP_NAME"] == "soup" and job["env"]["TUNELOOP_RECIPE"] == "recipes/soup.yaml"
    assert [s.get("with", {}).get("path") for s in job["steps"] if "cache" in s.get("uses", "")][0] == "workspace"
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "ci")
    ws = repo / "workspace"

    def ok(steps):
        assert [rc for _, rc, _ in steps] == [0] * len(runs), "\n".join(f"{n}: {rc}\n{out}" for n, rc, out in steps)
        return steps

    # ---- first run on main: nothing holds production yet, so the first version becomes it without a gate
    first = ok(run_steps(workflow, repo, bin_dir, "refs/heads/main", "push"))
    assert "soup@production → soup:1" in first[-1][2]
    assert registry.resolve(ws, "soup@production").ref == "soup:1"
    assert [(h["how"], h["to"]) for h in registry.history(ws, "soup")] == [("first", "soup:1")]
    assert (registry.resolve(ws, "soup:1").run_dir / "report.html").exists()  # the eval step's report

    # ---- second run on main, same workspace: the retrain passes the gate and is promoted
    second = ok(run_steps(workflow, repo, bin_dir, "refs/heads/main", "push"))
    assert "passes" in second[-1][2] and "promoted: production → soup:2" in second[-1][2]
    assert registry.resolve(ws, "soup@production").ref == "soup:2"
    assert [(h["how"], h["to"]) for h in registry.history(ws, "soup")] == [("first", "soup:1"), ("gate", "soup:2")]
    # the artifact globs of the upload step find this run's reports
    (gate_html,) = ws.glob("gates/soup-2-vs-*/gate.html")
    assert json.loads((gate_html.parent / "gate.json").read_text())["code"] == 0

    # ---- a pull request that breaks the learning rate: its gate fails the check (exit 1), nothing moves
    _git(repo, "checkout", "-q", "-b", "broken-lr")
    (repo / "recipes" / "soup.yaml").write_text(_recipe(tiny_llama_dir, BROKEN))
    _git(repo, "commit", "-qam", "lr")
    pr = run_steps(workflow, repo, bin_dir, "refs/pull/7/merge", "pull_request")
    assert [rc for _, rc, _ in pr] == [0] * (len(runs) - 1) + [1], pr[-1][2]
    assert "regression" in pr[-1][2] and "promoted" not in pr[-1][2]
    assert registry.resolve(ws, "soup@production").ref == "soup:2"
    assert len(registry.history(ws, "soup")) == 2
    (failed,) = ws.glob("gates/soup-3-vs-*/gate.json")
    assert json.loads(failed.read_text())["code"] == 1
    assert registry.resolve(ws, "soup:3").tags.get("git_commit") not in (None, registry.resolve(ws, "soup:2")
                                                                         .tags.get("git_commit"))


def test_init_refuses_to_overwrite_and_names_the_file(repo):
    out = init_workflow(repo, recipe=repo / "recipes" / "soup.yaml")
    before = out.read_text()
    with pytest.raises(TuneloopError, match=f"{out}: already exists; --force") as e:
        init_workflow(repo, recipe=repo / "recipes" / "soup.yaml", name="other")
    assert e.value.exit_code == 2 and out.read_text() == before
    init_workflow(repo, recipe=repo / "recipes" / "soup.yaml", name="other", force=True)
    assert yaml.safe_load(out.read_text())["jobs"]["tuneloop"]["env"]["TUNELOOP_NAME"] == "other"
    assert not list(out.parent.glob("*.tmp*"))  # written atomically, nothing left beside it


def test_init_without_a_recipe_takes_the_only_one(repo):
    out = init_workflow(repo)
    assert yaml.safe_load(out.read_text())["jobs"]["tuneloop"]["env"]["TUNELOOP_RECIPE"] == "recipes/soup.yaml"
    (repo / "recipes" / "two.yaml").write_text((repo / "recipes" / "soup.yaml").read_text())
    with pytest.raises(ConfigError, match="recipes found: recipes/soup.yaml, recipes/two.yaml"):
        init_workflow(repo, force=True)


def test_init_refuses_bad_input(repo, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown CI provider \(known: github\)"):
        init_workflow(repo, provider="jenkins", recipe=repo / "recipes" / "soup.yaml")
    outside = tmp_path / "outside.yaml"
    outside.write_text((repo / "recipes" / "soup.yaml").read_text())
    with pytest.raises(ConfigError, match="must be inside the repository"):
        init_workflow(repo, recipe=outside)
    with pytest.raises(NotFoundError, match="recipe file not found"):
        init_workflow(repo, recipe=repo / "recipes" / "nope.yaml")
    with pytest.raises(ConfigError, match="a registered name is"):
        init_workflow(repo, recipe=repo / "recipes" / "soup.yaml", name="a:b")
    with pytest.raises(ConfigError, match="absolute path"):
        init_workflow(repo, recipe=repo / "recipes" / "soup.yaml", workspace="relative/ws")
    assert not (repo / PROVIDERS["github"].path).exists()


def test_a_self_hosted_workspace_replaces_the_cache(repo):
    out = init_workflow(repo, recipe=repo / "recipes" / "soup.yaml", workspace="/srv/tuneloop/workspace")
    job = yaml.safe_load(out.read_text())["jobs"]["tuneloop"]
    assert job["runs-on"] == "self-hosted" and job["env"]["TUNELOOP_WORKSPACE"] == "/srv/tuneloop/workspace"
    assert not [s for s in job["steps"] if "cache" in s.get("uses", "")]
    upload = next(s for s in job["steps"] if "upload-artifact" in s.get("uses", ""))
    assert "/srv/tuneloop/workspace/gates/" in upload["with"]["path"]

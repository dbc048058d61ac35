"""`tuneloop ci init`: a CI workflow that checks the data, trains and registers a version, evaluates it and gates
it against production: on the main branch a version that passes becomes production, on a pull request a
regression fails the check. Its steps are `make setup` and `tuneloop` commands (with the shell glue that
carries the printed NAME:VERSION from one step to the next), so what CI does is what a person can type.

The registry must outlive a CI run, or every run is a first promotion: the workflow keeps the workspace
(mlflow.db, run folders, registry/, gates/) in the provider's cache, or, with `workspace=`, in a persistent
folder of a self-hosted runner, which a serving machine on that runner can read directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError, NotFoundError, TuneloopError
from .fileio import write_text_atomic

RECIPES_DIR = "recipes"


@dataclass(frozen=True)
class Workflow:
    """What the workflow is made from: the recipe (relative to the repository), the registered name, the branch
    whose runs promote, and the workspace (None: the provider's cache keeps `workspace/` of the checkout)."""

    recipe: str
    name: str
    branch: str = "main"
    workspace: str | None = None


@dataclass(frozen=True)
class Provider:
    path: str  # where the workflow file goes, relative to the repository root
    render: Callable[[Workflow], str]


def _indent(text: str, n: int) -> str:
    return "".join((" " * n + line) if line.strip() else line for line in text.splitlines(True))


# The steps as shell scripts, shared by every provider. Each runs under `bash -eo pipefail`: a failing
# tuneloop command fails its step with its own exit code (gate: 1 regression, 2 cannot compare). A step leaves
# variables for the next ones in $GITHUB_ENV; $GITHUB_REF is the ref the run is for.
SETUP = "make setup\n"

DATA_CHECK = 'tuneloop data check --recipe "$TUNELOOP_RECIPE"\n'

TRAIN = """\
tuneloop train "$TUNELOOP_RECIPE" --register "$TUNELOOP_NAME" --no-progress | tee "$RUNNER_TEMP/train.log"
# train prints `run: FOLDER` and `registered: NAME:VERSION`; the next steps use both
ref=$(sed -n 's/^registered: //p' "$RUNNER_TEMP/train.log")
run=$(sed -n 's/^run: //p' "$RUNNER_TEMP/train.log")
echo "TUNELOOP_REF=$ref" >> "$GITHUB_ENV"
echo "TUNELOOP_RUN=$run" >> "$GITHUB_ENV"
# the gate's report folder starts with the candidate: <workspace>/gates/NAME-VERSION-vs-...
echo "TUNELOOP_GATES=${ref/:/-}-vs-" >> "$GITHUB_ENV"
"""

EVAL = 'tuneloop eval "$TUNELOOP_RUN" --no-progress\n'

GATE = """\
# No production yet (`registry show` exits 3: not found): there is nothing to regress against. On the main
# branch the first version becomes production (the registry lets the first holder of an alias in without a
# gate, and refuses this promotion once a holder exists); a pull request passes.
held=0
tuneloop registry show "$TUNELOOP_NAME@production" > /dev/null || held=$?
if [ "$held" = 3 ]; then
  if [ "$GITHUB_REF" = "$TUNELOOP_PROMOTE_REF" ]; then
    tuneloop registry promote "$TUNELOOP_REF" --alias production
  else
    echo "$TUNELOOP_NAME@production does not exist yet: nothing to gate $TUNELOOP_REF against"
  fi
elif [ "$held" != 0 ]; then
  exit "$held"
elif [ "$GITHUB_REF" = "$TUNELOOP_PROMOTE_REF" ]; then
  # exit 0: promoted; 1: a regression, production stays; 2: cannot compare
  tuneloop gate "$TUNELOOP_REF" --against "$TUNELOOP_NAME@production" --promote
else
  # a pull request: the same decision, nothing moves, and a regression fails the check
  tuneloop gate "$TUNELOOP_REF" --against "$TUNELOOP_NAME@production"
fi
"""


def _github(w: Workflow) -> str:
    hosted = w.workspace is None
    if hosted:
        where = """\
# The workspace (mlflow.db with the registry, run folders, registry/, gates/) must outlive a run, or every run
# is a first promotion. Here it is `workspace/` of the checkout, kept in the GitHub Actions cache: each run
# restores the newest copy (a pull request reads main's; what it saves stays its own, so a pull request never
# changes main's registry) and saves a new one, also after a failed gate, so the history keeps it. The cache
# is evicted after 7 days unused or past 10 GB per repository; then the next run is a first promotion again.
# A serving machine cannot read it: for `tuneloop serve -m NAME@production` to follow promotions, use a
# self-hosted runner with a persistent folder the server shares (`tuneloop ci init --workspace /srv/...`).
"""
        runs_on, workspace = "ubuntu-latest", "workspace"
    else:
        where = f"""\
# The workspace (mlflow.db with the registry, run folders, registry/, gates/) must outlive a run, or every run
# is a first promotion. Here it is the persistent folder {w.workspace} on a self-hosted runner, outside the
# checkout; a server started with `-w {w.workspace}` (or the same folder synced) follows NAME@production.
"""
        runs_on, workspace = "self-hosted", w.workspace
    cache_restore = """\
- name: Restore the workspace (the registry)
  uses: actions/cache/restore@v4
  with:
    path: workspace
    key: tuneloop-workspace-${{ github.run_id }}-${{ github.run_attempt }}
    restore-keys: tuneloop-workspace-
""" if hosted else ""
    cache_save = """\
- name: Save the workspace (the registry)
  if: always()
  uses: actions/cache/save@v4
  with:
    path: workspace
    key: tuneloop-workspace-${{ github.run_id }}-${{ github.run_attempt }}
""" if hosted else ""
    model_cache = """\
- name: Cache the converted base model
  uses: actions/cache@v4
  with:
    path: ~/.cache/tuneloop
    key: tuneloop-models-${{ hashFiles('Makefile', 'constraints.txt') }}
""" if hosted else ""

    def step(name: str, script: str) -> str:
        return f"- name: {name}\n  run: |\n{_indent(script, 4)}"

    setup = SETUP + "# the next steps call the venv's `tuneloop`\necho \"$PWD/.venv/bin\" >> \"$GITHUB_PATH\"\n"
    steps = "".join([
        "- uses: actions/checkout@v4\n",
        "- uses: actions/setup-python@v5\n  with:\n    python-version: \"3.11\"\n" if hosted else "",
        cache_restore, model_cache,
        step("Set up", setup),
        step("Check the data", DATA_CHECK),
        step("Train and register", TRAIN),
        step("Evaluate", EVAL),
        step("Gate (promote on " + w.branch + ")", GATE),
        "- name: Upload the reports\n  if: always()\n  uses: actions/upload-artifact@v4\n  with:\n"
        "    name: tuneloop-reports\n    if-no-files-found: warn\n    path: |\n"
        "      ${{ env.TUNELOOP_RUN }}/report.html\n      ${{ env.TUNELOOP_RUN }}/report.json\n"
        f"      {workspace}/gates/${{{{ env.TUNELOOP_GATES }}}}*/gate.html\n"
        f"      {workspace}/gates/${{{{ env.TUNELOOP_GATES }}}}*/gate.json\n",
        cache_save,
    ])
    return f"""\
# Written by `tuneloop ci init`: check the data, train and register a version of {w.name}, evaluate it, gate it
# against {w.name}@production. On {w.branch} a version that passes becomes production; on a pull request a
# regression fails the check (gate exit codes: 0 passes, 1 regression, 2 cannot compare).
{where}name: tuneloop

on:
  push:
    branches: [{w.branch}]
  pull_request:
  workflow_dispatch:

# one run at a time per branch: two runs promoting from one registry must not interleave
concurrency:
  group: tuneloop-${{{{ github.ref }}}}
  cancel-in-progress: false

permissions:
  contents: read

jobs:
  tuneloop:
    runs-on: {runs_on}
    # -o pipefail: `tuneloop train ... | tee` fails when train does
    defaults:
      run:
        shell: bash
    env:
      TUNELOOP_RECIPE: {json.dumps(w.recipe)}
      TUNELOOP_NAME: {json.dumps(w.name)}
      TUNELOOP_WORKSPACE: {json.dumps(workspace)}
      # runs on this ref promote; every other ref (pull requests) only gates
      TUNELOOP_PROMOTE_REF: refs/heads/{w.branch}
      # rich wraps printed lines at 80 columns off a terminal; the steps read `run:` and `registered:` lines
      COLUMNS: "400"
    steps:
{_indent(steps, 6)}"""


# Providers by name: where the workflow file goes and how it is written.
PROVIDERS: dict[str, Provider] = {
    "github": Provider(path=".github/workflows/tuneloop.yml", render=_github),
}


def provider_for(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ConfigError(f"--provider {name!r}: unknown CI provider (known: {', '.join(sorted(PROVIDERS))})")
    return PROVIDERS[name]


def _default_recipe(root: Path) -> Path:
    found = sorted((root / RECIPES_DIR).glob("*.yaml")) + sorted((root / RECIPES_DIR).glob("*.yml"))
    if len(found) == 1:
        return found[0]
    listed = ", ".join(str(p.relative_to(root)) for p in found) or f"none in {root / RECIPES_DIR}"
    raise ConfigError(f"--recipe: name the recipe CI trains (recipes found: {listed})")


def init_workflow(root: Path, provider: str = "github", recipe: Path | None = None, name: str | None = None,
                  branch: str = "main", workspace: str | None = None, force: bool = False) -> Path:
    """Write the CI workflow for `provider` into the repository at `root`; returns its path. The recipe must
    lie inside the repository (CI sees only the checkout); the name defaults to the recipe's. An existing
    workflow file is kept unless `force`."""
    from .config import load_recipe
    from .registry import _check_name, default_name

    p = provider_for(provider)
    root = Path(root).resolve()
    recipe_path = (_default_recipe(root) if recipe is None else Path(recipe)).resolve()
    if not recipe_path.is_file():
        raise NotFoundError(f"{recipe}: recipe file not found")
    try:
        rel = recipe_path.relative_to(root)
    except ValueError:
        raise ConfigError(f"{recipe}: the recipe must be inside the repository {root}: CI sees only the "
                          f"checkout") from None
    r = load_recipe(recipe_path)
    name = _check_name(name) if name is not None else default_name(r.name)
    if not branch or any(c.isspace() for c in branch):
        raise ConfigError(f"--branch {branch!r}: a branch name, e.g. main")
    if workspace is not None and not Path(workspace).is_absolute():
        raise ConfigError(f"--workspace {workspace!r}: the runner's persistent folder, as an absolute path")
    out = root / p.path
    if out.exists() and not force:
        raise TuneloopError(f"{out}: already exists; --force overwrites it")
    text = p.render(Workflow(recipe=rel.as_posix(), name=name, branch=branch, workspace=workspace))
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out, text)

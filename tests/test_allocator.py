"""Training commands start themselves again on jemalloc where the machine has it (tuneloop/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tuneloop import allocator


def test_the_restart_environment_adds_the_preload_once_and_respects_the_user():
    lib = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    env = allocator.restart_env({"PATH": "/bin", "LD_PRELOAD": "/opt/other.so"}, lib)
    assert env["LD_PRELOAD"] == f"{lib} /opt/other.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == allocator.MALLOC_CONF and env[allocator.ENV] == "jemalloc"
    assert allocator.restart_env({"MALLOC_CONF": "narenas:1"}, lib)["MALLOC_CONF"] == "narenas:1"
    assert allocator.restart_env({}, None) is None  # no library on this machine
    assert allocator.restart_env({allocator.ENV: "system"}, lib) is None  # the user keeps glibc
    assert allocator.restart_env({allocator.ENV: "jemalloc"}, lib) is None  # the restarted process itself
    assert allocator.restart_env({"LD_PRELOAD": lib}, lib) is None  # preloaded already


def test_inside_another_process_the_cli_never_restarts():
    # torch is loaded here and sys.argv is not pytest's command line: both keep the process as it is
    allocator.maybe_restart(["tuneloop", "train", "recipe.yaml"])
    allocator.maybe_restart(["tuneloop", "serve"])


SCRIPT = """
import os, sys
from tuneloop import allocator
allocator.maybe_restart(sys.argv)
import torch  # what a training command goes on to do
print(allocator.in_use(), os.environ.get(allocator.ENV))
"""


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="no libjemalloc2 here (`make jemalloc` installs it)")
@pytest.mark.parametrize("setting, expected", [(None, "jemalloc jemalloc"), ("system", "system system")])
def test_a_training_command_runs_on_jemalloc_unless_told_not_to(tmp_path, setting, expected):
    script = tmp_path / "cmd.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, "LD_PRELOAD", "MALLOC_CONF")}
    if setting:
        env[allocator.ENV] = setting
    out = subprocess.run([sys.executable, str(script), "train"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == expected.split()
    # a command that does not train keeps the system's malloc
    out = subprocess.run([sys.executable, str(script), "serve"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split()[0] == "system"


def test_a_bench_child_gets_the_malloc_it_is_given():
    base = {"PATH": "/bin", "LD_PRELOAD": "/x/libjemalloc.so.2", allocator.ENV: "jemalloc", "MALLOC_CONF": "a:1"}
    system = allocator.child_env(base, jemalloc=False)
    assert system == {"PATH": "/bin", allocator.ENV: "system"}  # whatever this process runs on
    if allocator.find_jemalloc() is None:
        with pytest.raises(FileNotFoundError, match="make jemalloc"):
            allocator.child_env(base, jemalloc=True)
    else:
        env = allocator.child_env(base, jemalloc=True)
        assert env["LD_PRELOAD"] == allocator.find_jemalloc() and env["MALLOC_CONF"] == allocator.MALLOC_CONF

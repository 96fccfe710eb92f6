"""The `mi-opt` entry point: user errors are one line, interruptions unwind cleanly."""
from __future__ import annotations

import subprocess
import sys

SIGTERM_DURING_A_VERB = """
import os, signal, sys, time
import mi_opt.cli.validate as verb
from mi_opt.cli import main

def killed(args):
    os.kill(os.getpid(), signal.SIGTERM)  # what timeout, Slurm and Kubernetes send
    time.sleep(30)
    return 0

verb.run = killed
sys.exit(main(["validate", "any.yaml"]))
"""


def test_sigterm_unwinds_like_ctrl_c():
    done = subprocess.run([sys.executable, "-c", SIGTERM_DURING_A_VERB], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert "mi-opt validate: interrupted; finished outputs are kept" in done.stderr

"""A signal before the first training step ends the process at once (issue 25, item 3): the step the pre-emption
handler would wait for may never come (input that yields nothing), and nothing new would be saved anyway."""

from __future__ import annotations

import signal

from conftest import run_py

SCRIPT = """
import os, signal, sys, time
from types import SimpleNamespace
from clip_train.checkpoint.preemption import PreemptionHandler

handler = PreemptionHandler()
args = SimpleNamespace(save_strategy="steps")
handler.on_train_begin(args, SimpleNamespace(), None)  # installs the handler, as the Trainer's train() does
if sys.argv[1] == "after-a-step":
    handler.on_step_begin(args, SimpleNamespace(), None)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)  # the handler has run
print("lives on until the step ends", flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # a second one: the user means it
time.sleep(0.5)
print("still alive")
"""


def test_sigterm_before_the_first_step_ends_the_process_and_a_second_one_always_does():
    before = run_py(["-c", SCRIPT, "before-any-step"], timeout=120)
    assert before.returncode == -signal.SIGTERM and before.stdout == "", before.stdout + before.stderr[-2000:]
    during = run_py(["-c", SCRIPT, "after-a-step"], timeout=120)
    assert during.returncode == -signal.SIGTERM, during.stdout + during.stderr[-2000:]
    assert during.stdout == "lives on until the step ends\n"

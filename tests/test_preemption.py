"""preemption.py: a real SIGTERM mid-training ends in a verified checkpoint and exit code 75."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ckptguard import CheckpointManager, verify_checkpoint
from ckptguard.run.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatcher

LOOP = textwrap.dedent(
    """
    import sys, time, torch
    from ckptguard import CheckpointManager
    from ckptguard.run.preemption import PreemptionWatcher, PREEMPTED_EXIT_CODE
    mgr = CheckpointManager(sys.argv[1], keep_last=2)
    watcher = PreemptionWatcher()
    w = torch.zeros(4)
    for step in range(1, 100_000):
        w += 1                      # one "training step"
        print(step, flush=True)
        if watcher.should_stop():   # step boundary
            mgr.save(step, {"w": w, "step": step})
            mgr.close()
            sys.exit(PREEMPTED_EXIT_CODE)
        time.sleep(0.01)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_at_next_step_boundary_and_exits_75(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    seen = [int(proc.stdout.readline()) for _ in range(5)]
    proc.send_signal(sig)
    rest = proc.stdout.read().split()
    assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE
    last = int(rest[-1]) if rest else seen[-1]
    with CheckpointManager(tmp_path / "run") as mgr:
        restored = mgr.restore({"w": None, "step": None})
    assert restored.step == last and restored.values["w"].tolist() == [float(last)] * 4
    assert verify_checkpoint(restored.path).ok


def test_a_repeated_abort_signal_raises_keyboard_interrupt_at_once(capfd):
    # what was installed before: default_int_handler, or SIG_IGN where the suite runs as a background job
    before = signal.getsignal(signal.SIGINT)
    with PreemptionWatcher(abort_on_repeat=(signal.SIGINT,)) as watcher:
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: a stop request, noted on stderr
        assert watcher.received is signal.SIGINT
        assert (
            "SIGINT: saving at the next step boundary, then exiting (SIGINT again: abort now)" in capfd.readouterr().err
        )
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        try:  # raised once: the abort's cleanup and its message are not cut short by a third
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pytest.fail("a third SIGINT raised KeyboardInterrupt again, in the middle of the abort")
    assert signal.getsignal(signal.SIGINT) is before  # restored on exit


def _swallowing(sig: signal.Signals) -> None:
    """Code that catches everything around a signal, as an extension module's import can."""
    try:
        os.kill(os.getpid(), sig)  # the handler raises Preempted here, at the next bytecode
        sum(range(1000))
    except BaseException:
        pass


def test_a_stop_signal_swallowed_by_the_interrupted_code_still_stops_the_work():
    # the work ends normally: the stop is raised on the way out
    with PreemptionWatcher() as watcher, pytest.raises(Preempted), watcher.interrupting():
        _swallowing(signal.SIGTERM)
    # the work fails afterwards: the stop wins, and the failure is chained to it
    with PreemptionWatcher() as watcher, pytest.raises(Preempted) as stopped, watcher.interrupting():
        _swallowing(signal.SIGTERM)
        raise ValueError("a render that ran out of time")
    assert isinstance(stopped.value.__cause__, ValueError)


def test_after_the_loop_ends_a_first_ctrl_c_is_not_promised_a_save(capfd):
    with PreemptionWatcher(abort_on_repeat=(signal.SIGINT,)) as watcher:
        watcher.ending()
        os.kill(os.getpid(), signal.SIGINT)
        assert "SIGINT: the run is ending already (SIGINT again: abort now)" in capfd.readouterr().err


EXITING = textwrap.dedent(
    """
    import atexit, sys
    from ckptguard.run.preemption import ignore_stop_signals_at_exit
    atexit.register(lambda: (print("exiting", flush=True), sys.stdin.read()))  # runs after the next one
    ignore_stop_signals_at_exit()
    ignore_stop_signals_at_exit()
    """
)


def test_a_signal_during_the_interpreters_exit_keeps_the_exit_code():
    """torch's teardown takes a second after the trainer's last line: a SIGTERM there must not make it -15."""
    proc = subprocess.Popen([sys.executable, "-c", EXITING], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "exiting\n"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    assert proc.communicate(input="", timeout=60) == ("", None)
    assert proc.returncode == 0

"""The GPU check script runs its code paths on tiny shapes on CPU (the real run needs a GPU)."""

from repro.gpu_check import main


def test_gpu_check_quick_on_cpu(capsys):
    # sd_smoke runs the same subprocess path as pfgmpp_smoke; the smoke regression test covers its numbers.
    assert main(["--device", "cpu", "--quick", "--skip", "torchrun", "inception", "sd_smoke"]) == 0
    out = capsys.readouterr().out
    assert "ok   samplers: Heun 18 steps NFE 35" in out and "Restart (VP, NFE 43) NFE 43" in out
    assert "ok   pfgmpp_smoke: restart.table3 smoke (pfgmpp) on cpu" in out and "over 2 metrics" in out

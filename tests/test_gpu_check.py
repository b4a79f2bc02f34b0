"""The GPU check script runs its code paths on tiny shapes on CPU (the real run needs a GPU)."""

from repro.gpu_check import main


def test_gpu_check_quick_on_cpu(capsys):
    assert main(["--device", "cpu", "--quick", "--skip", "torchrun", "inception"]) == 0
    out = capsys.readouterr().out
    assert "ok   samplers: Heun 18 steps NFE 35" in out and "Restart (VP, NFE 43) NFE 43" in out

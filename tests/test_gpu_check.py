"""`make gpu-check` on a machine without CUDA: the same code path in float32, and it says so."""

from __future__ import annotations

import re

import pytest
import torch

from research import gpu_check

pytestmark = [pytest.mark.slow]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_check_without_cuda_runs_the_embedded_model_in_float32(capsys):
    assert gpu_check.main(["--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU found" in out
    line = next(line for line in out.splitlines() if "reconstruction PSNR" in line)
    assert "tiny-digits on cpu (torch.float32, 32px, 2 images)" in line
    psnr = float(re.search(r"PSNR ([0-9.]+) dB", line).group(1))
    assert psnr > 25 and "failed 0" in line

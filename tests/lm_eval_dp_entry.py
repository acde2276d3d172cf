"""Entry point of test_lm_eval_runner.py's data-parallel test: eval/run_lm_eval.py, one process per rank.

lm-eval's HFLM turns on data parallelism (`accelerate launch`) only when it counts more than one GPU, so
each process here reports two; they compute on the CPU and talk through gloo (ACCELERATE_USE_CPU=1), which
is how accelerate runs CPU processes. Everything else is the code path of a multi-GPU run.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.cuda.device_count = lambda: 2

from eval import run_lm_eval  # noqa: E402

sys.exit(run_lm_eval.main())

"""A run of the training script train/run.py, in a child process as from the command line
(train/ is a folder of scripts, not a package): its exit status, its time and the records it
wrote to metrics.jsonl, one per epoch."""
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train" / "run.py"


@dataclass
class TrainingRun:
    command: List[str]
    returncode: int
    seconds: float
    stderr: str
    metrics: List[Dict] = field(default_factory=list)

    def last(self) -> Dict:
        """The last epoch's record (what run.main returns), or RuntimeError with the run's
        error output when it failed or recorded no epoch."""
        if self.returncode != 0 or not self.metrics:
            raise RuntimeError(f"{' '.join(self.command)} exited {self.returncode} after "
                               f"{len(self.metrics)} epoch(s):\n{self.stderr[-3000:]}")
        return self.metrics[-1]


def run_training(args: Sequence[str], output: str,
                 timeout: Optional[float] = None) -> TrainingRun:
    """python train/run.py `args` (which name `output` with --output), waited for."""
    command = [sys.executable, str(TRAIN_SCRIPT), *args]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    metrics_path = Path(output) / "metrics.jsonl"
    metrics = ([json.loads(line) for line in metrics_path.read_text().splitlines()]
               if metrics_path.is_file() else [])
    return TrainingRun(command, result.returncode, seconds, result.stderr, metrics)

"""Worker of tests/test_gpu.py (a GPU only): every launch the project makes
(dali_relabel.ops.testing), compiled by Triton's JIT for this GPU, against the reference on the
same device; reruns bit-identical."""
import torch

from dali_relabel import label_pooling, reference_label_pooling
from dali_relabel.ops import testing


def main() -> None:
    failures = []
    for name, kwargs in testing.launches("cuda"):
        runs = [label_pooling(**kwargs, check_inputs=False) for _ in range(2)]
        want = reference_label_pooling(**kwargs, check_inputs=False)
        diff = float((runs[0] - want).abs().max())
        if not diff <= 1e-5 or not torch.equal(runs[0], runs[1]):
            failures.append((name, diff))
    assert not failures, failures[:20]


if __name__ == "__main__":
    main()

"""Means with a Student-t 95% interval: over seeds (ablation) and over the ratios of paired
timing segments (loader_bench)."""
import math
import statistics
from typing import Dict, Sequence

# Two-sided 95% quantiles of Student's t by degrees of freedom 1-30 (normal beyond).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values: Sequence[float]) -> Dict[str, object]:
    """Mean of `values` (at least two), its standard error and 95% interval (Student's t)."""
    if len(values) < 2:
        raise ValueError(f"values: expected at least 2, found {len(values)}")
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values))
    t = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96
    return dict(mean=mean, se=se, ci95=[mean - t * se, mean + t * se])


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float]
                   ) -> Dict[str, object]:
    """The geometric mean of the paired ratios numerators[i] / denominators[i], in percent,
    with its 95% interval (Student's t on the log ratios): `percent`, `percent_ci95`."""
    interval = mean_interval([math.log(n / d)
                              for n, d in zip(numerators, denominators, strict=True)])
    return dict(percent=100 * math.exp(interval["mean"]),
                percent_ci95=[100 * math.exp(v) for v in interval["ci95"]])

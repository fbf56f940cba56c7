"""Scores to numbers: metrics and result files (``metrics``), thresholds without anomalies (``calibration``), tables
and plots (``report``), which caches a run can score (``compat``)."""

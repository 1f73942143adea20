"""Seeing the balance between tasks: the run report, run comparison, live epoch signals, alarms.

- `html.write_report(run_dir)`: report.html for a local or s3:// run directory;
- `compare.write_comparison(runs, out)`: one page comparing runs side by side;
- `live.EpochSink(run_dir, config)`: the trainer's per-epoch hook (console line, TensorBoard,
  MLflow, alarms); `live.epoch_progress` is the per-epoch progress bar;
- `alarms`: the balance checks both of them use.

Imports no Ray and no torch at module level (the TensorBoard writer imports torch when used).
"""

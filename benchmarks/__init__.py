"""The project's benchmarks as a package: the job runner (`launching`), the sample-efficiency
methods and their tuning (`sample_efficiency`, `regimes`), the PRM studies and the throughput
and memory measurements. Each module is also a script (`python benchmarks/NAME.py ...` or
`python -m benchmarks.NAME ...`); the package is installed with the project, so no script
edits `sys.path`."""

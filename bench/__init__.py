"""The dermpacs benchmark suite: receive, inference, end to end, GPU.

Run it with ``make bench`` (the whole suite, bounded in time, results written to
``docs/benchmarks.md``) or ``python -m bench --short`` (a handful of small photos: checks that
the harness works, asserts no times). Each part is also a module with its own ``main``:
``python -m bench.receive``, ``python -m bench.inference``, ``python -m bench.end_to_end``,
``python -m bench.gpu_inference`` (the last needs a CUDA machine).

Every figure is measured beside its baseline in the same run (dcmtk ``storescp`` and Orthanc
for receiving; the old worker path -- eager PyTorch on the full decode -- for the worker's
fast path and for compiled networks), and every result file records the machine, the command
and the date.
"""

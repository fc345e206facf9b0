"""ctloop's benchmarks: what the platform costs against doing the same work in-process.

Each benchmark measures ctloop and its in-process (or direct-client) baseline in the same run,
on the same input and thread settings, interleaved, and reports medians and their ratio.
``python -m bench --preset quick`` runs them all; see bench/README.md.
"""

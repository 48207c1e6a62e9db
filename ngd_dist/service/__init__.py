"""The training service behind ``ngd-dist``: jobs, the worker's loop, checkpoints, metrics, launchers.

It uses the library (:mod:`ngd_dist.kfac`); the library never imports it.
"""

"""Change trackers: which chunks of a block device may differ from the last acknowledged version.

One interface (:class:`nbdsink.tracker.base.Tracker`), several backends: ``bpf`` (eBPF on the
block completion tracepoint), ``dm`` (the nbdsink device-mapper target in ``kmod/dm``) and
``scan`` (no kernel help: hash every chunk and compare with reference digests).
"""

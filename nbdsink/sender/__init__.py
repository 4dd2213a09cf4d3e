"""The sender, ``nbdsink replicate``: first sync, cycles, freeze, state.

Modules, each owning one thing:

- :mod:`.state` -- the state directory (what was last acknowledged, atomic rename, lock)
- :mod:`.device` -- the source device read with O_DIRECT into aligned buffers
- :mod:`.plan` -- extent arithmetic and the coalescing of chunks into large requests
- :mod:`.transfer` -- the pipeline: read, classify, a window of requests in flight
- :mod:`.remote` -- the backup side as the sender sees it, over the trio NBD client
- :mod:`.freeze` -- FIFREEZE/FITHAW, and thawing a filesystem left frozen by a dead sender
- :mod:`.hooks`, :mod:`.ratelimit`, :mod:`.progress`, :mod:`.units` -- small helpers
- :mod:`.cycle` -- one replication cycle, written over injected interfaces
- :mod:`.replicator` -- the continuous loop: interval, reconnects with backoff, SIGTERM
"""

"""nbdkit plugin for nbdsink, as a file nbdkit can load:

    nbdkit python plugins/nbdsink_plugin.py store=/var/lib/nbdsink

A thin shim: the plugin is :mod:`nbdsink.server.nbdkit_plugin` (installed with the package,
which ``nbdsink serve`` runs directly). nbdkit adds neither this folder nor a virtualenv to
``sys.path``, so the package is found from NBDSINK_SITE_DIRS or from this checkout.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

_repo = Path(__file__).resolve().parent.parent
for _d in [d for d in os.environ.get("NBDSINK_SITE_DIRS", "").split(os.pathsep) if d] + [
        str(_repo), *map(str, _repo.glob(".venv/lib/python3*/site-packages"))]:
    if _d not in sys.path and os.path.isdir(_d):
        site.addsitedir(_d)

from nbdsink.server.nbdkit_plugin import *  # noqa: E402,F403
from nbdsink.server.nbdkit_plugin import API_VERSION  # noqa: E402,F401

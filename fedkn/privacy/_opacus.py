"""Import Opacus without the root log handler it installs.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` on import, which would echo every
Flower log line to the console. :mod:`fedkn.privacy` imports this module before anything else.
"""

import logging

_root = logging.getLogger()
_before = list(_root.handlers)
import opacus  # noqa: F401

for _handler in [h for h in _root.handlers if h not in _before]:
    _root.removeHandler(_handler)

"""Moved to `kopru.training.checkpoint`. This import path keeps working: it is that same module (not a copy), so
attributes set or patched through either name are seen through both."""

import sys

from kopru.training import checkpoint

sys.modules[__name__] = checkpoint

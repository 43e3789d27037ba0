"""Moved to `kopru.training.qformer_stage1`. This import path keeps working: it is that same module (not a copy), so
attributes set or patched through either name are seen through both."""

import sys

from kopru.training import qformer_stage1

sys.modules[__name__] = qformer_stage1

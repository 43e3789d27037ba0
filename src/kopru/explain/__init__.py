"""`kopru explain`: the architecture mathematics of a vision-language model."""

from kopru.explain.architectures import *  # noqa: F403
from kopru.explain.architectures import Settings, _context, preset_target  # noqa: F401

"""Generation: the reference loop, the serving engine, sampling, streaming text and chat formatting."""

from kopru.generation.engine import *  # noqa: F403

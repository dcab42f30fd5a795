"""anelab: attention-based semantic guidance (Attend-and-Excite) for Stable Diffusion, for study."""

from .config import GuidanceConfig
from .errors import AnelabError
from .loading import load_pipeline
from .pipeline import GuidedOutput, generate

__version__ = "0.1.0"
__all__ = ["AnelabError", "GuidanceConfig", "GuidedOutput", "generate", "load_pipeline", "__version__"]

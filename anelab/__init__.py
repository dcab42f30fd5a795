"""anelab: attention-based semantic guidance (Attend-and-Excite) for Stable Diffusion, for study."""

from .config import GuidanceConfig
from .errors import AnelabError
from .loading import load_pipeline
from .pipeline import GuidedOutput, generate
from .recording import Record

__version__ = "0.1.0"
__all__ = ["AnelabError", "GuidanceConfig", "GuidedOutput", "Record", "generate", "load_pipeline", "__version__"]

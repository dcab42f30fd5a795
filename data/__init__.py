"""Package data: the A&E prompt set, the CLIP templates and the study files. Installed as ``anelab.data``
and read with importlib.resources (anelab/resources.py); this top-level folder is the only copy."""

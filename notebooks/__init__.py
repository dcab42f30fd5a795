"""The report notebooks. Installed as ``anelab.notebooks`` so that ``anelab report`` finds them in a wheel;
this top-level folder is the only copy (open and edit them here)."""

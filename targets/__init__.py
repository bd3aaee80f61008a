"""Target profiles: the schema (profiles.py: TargetProfile, its bounds and policies, devices and dtypes) and one TOML
file per device, shipped as package data."""

from edgecompress.folder_names import defer_to_installed, imported_by_folder_name

if imported_by_folder_name(__name__):  # the clone is on sys.path: this is not edgecompress.targets
    defer_to_installed(__name__, __file__)

"""Target profiles: one TOML file per device, shipped as package data (see edgecompress.profiles)."""

from edgecompress.folder_names import defer_to_installed, imported_by_folder_name

if imported_by_folder_name(__name__):  # the clone is on sys.path: this is not edgecompress.targets
    defer_to_installed(__name__, __file__)

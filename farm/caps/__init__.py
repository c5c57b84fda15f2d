"""Pure functions over libvirt's ``.replies`` dumps.

Nothing here does I/O beyond reading a dump; everything else in farm depends on
this package and it depends on nothing else in farm.
"""

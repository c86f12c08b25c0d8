"""The package version, apart from the package so that its modules can read it without an import cycle."""
__version__ = "0.1.0"

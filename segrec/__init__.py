"""segrec: readable user segments and explained recommendations from behaviour data."""

__version__ = "0.1.0"

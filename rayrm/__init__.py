"""rayrm: robot reward models (ReWiND progress, SARM stages) trained at scale on Ray.

The package follows the flow of the data: ``data`` (raw HDF5 episodes, Parquet schema,
synthetic episodes) -> ``backbones`` + ``embed`` (Ray Data) -> ``train`` (Ray Train) ->
``evaluate`` (reward curves, metrics, plots). ``cli`` and ``pipeline`` tie them together.
"""

__version__ = "0.1.0"

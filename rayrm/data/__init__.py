"""Data layouts (``schema``), raw HDF5 reading (``hdf5``), embedding shards (``shards``) and
synthetic episodes (``synthetic``)."""

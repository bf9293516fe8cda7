"""handprop.grids: experiment grids, a CSV of rows each of which is a run.

``grid`` reads a grid and runs its rows on this machine (``--jobs N`` processes) and
writes its summary; ``cluster`` sends the rows to a Dask cluster and writes the run
folders that come back the same way.
"""
